import trio

import trio_sign


async def test_trio_mode_runs() -> None:
    await trio.sleep(0)
    assert trio_sign.__version__
