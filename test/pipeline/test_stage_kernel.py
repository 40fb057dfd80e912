"""One kernel for the stage notebooks of a movie's run: reused, reset between notebooks as a
fresh kernel would be, replaced when it died, and a clear line for a kernel name that does not
exist."""

from __future__ import annotations

import os
import signal
import time

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_core.utils import run_sync

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.runner import StageKernel, notebook_dir


def _run(km, code: str, counts: list[int] | None = None) -> str:
    """Execute ``code`` in the kernel behind ``km`` and return what it printed (the execution
    count the notebook would show goes to ``counts``)."""
    kc = BlockingKernelClient()
    kc.load_connection_info(km.get_connection_info())
    kc.start_channels()
    out: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
        if counts is not None:
            counts.append(reply["content"]["execution_count"])
    finally:
        kc.stop_channels()
    return "".join(out)


def _started(km, cwd):
    """Start the kernel as nbclient does with the first notebook (papermill runs it)."""
    assert not km.has_kernel
    run_sync(km.start_kernel)(extra_arguments=["--HistoryManager.hist_file=:memory:"], cwd=str(cwd))
    return km


def test_kernel_is_reused_and_reset_between_notebooks(tmp_path):
    kernel = StageKernel("python3")
    try:
        km = _started(kernel.manager(), tmp_path)
        assert kernel.fresh
        first = _run(km, "import os, json\nleft_over = 41\nprint(os.getpid(), os.getcwd())")
        pid, cwd = first.split()
        assert cwd == str(tmp_path)

        km = kernel.manager()  # the next notebook: same process, namespace as new
        assert not kernel.fresh
        code = (
            "import os, sys\n"
            "print(os.getpid(), 'left_over' in globals(), 'json' in globals(), 'json' in sys.modules,\n"
            "      sys.modules['__main__'].__spec__ is None)"
        )
        counts: list[int] = []
        second = _run(km, code, counts).split()
        # same kernel; the earlier notebook's names are gone, its imports stay loaded, the module's
        # dunders (multiprocessing's spawn reads __main__.__spec__) are back, counting restarts at 1
        assert second == [pid, "False", "False", "True", "True"]
        assert counts == [1]

        os.kill(int(pid), signal.SIGKILL)  # as the system does when memory runs out
        deadline = time.monotonic() + 30
        while run_sync(km.is_alive)() and time.monotonic() < deadline:
            time.sleep(0.1)
        replacement = kernel.manager()
        assert kernel.fresh and replacement is not km
        assert _run(_started(replacement, tmp_path), "import os\nprint(os.getpid())").strip() != pid
    finally:
        kernel.close()
    assert kernel._km is None
    kernel.close()  # closing twice is harmless


def test_a_kernel_name_that_does_not_exist_is_one_line():
    kernel = StageKernel("no-such-kernel-here")
    with pytest.raises(StageError, match=r"run.kernel: no Jupyter kernel named 'no-such-kernel-here'"):
        kernel.manager()
    kernel.close()


def test_a_kernel_started_ahead_is_the_first_notebooks():
    kernel = StageKernel("python3")
    try:
        kernel.start()  # what a run does before its first notebook
        km = kernel._km
        assert km.has_kernel
        kernel.start()  # already running: nothing new
        assert kernel._km is km
        assert kernel.manager() is km
        assert kernel.fresh  # the first notebook still counts as the kernel's start (the log says so)
        # started as nbclient would start it: in the notebooks' folder, history kept in memory
        cwd, hist = _run(km, "import os\nprint(os.getcwd(), get_ipython().history_manager.hist_file)").split()
        assert cwd == str(notebook_dir()) and hist == ":memory:"
    finally:
        kernel.close()
    assert kernel._km is None
