"""One kernel for the stage notebooks of a movie's run: reused, reset between notebooks as a
fresh kernel would be, replaced when it died, and a clear line for a kernel name that does not
exist.

The tests talk to the kernel through a client made by its manager (``km.blocking_client()``),
as nbclient does. A client that only loads the connection file judges whether the kernel lives
by its heartbeat, with a 1 s reply limit: a kernel still starting (a cold machine importing
ipykernel without compiled bytecode takes seconds before it binds its heartbeat socket) misses
that second, and ``wait_for_ready`` gave up with "Kernel died before replying to kernel_info"
(the fresh-machine flake; :func:`test_a_slow_starting_kernel_is_waited_for`). A
manager's client asks the manager whether the process runs, so it waits for the reply.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from jupyter_core.utils import run_sync

from diffusion_bunny.errors import StageError
from diffusion_bunny.pipeline.runner import StageKernel, _kernel_sockets, notebook_dir


def _run(km, code: str, counts: list[int] | None = None) -> str:
    """Execute ``code`` in the kernel behind ``km`` and return what it printed (the execution
    count the notebook would show goes to ``counts``)."""
    kc = km.blocking_client()  # liveness from the process, not a 1 s heartbeat (module docstring)
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
        # Over socket files of its own, not TCP ports another process could take between the
        # run choosing them and the kernel binding them; absolute, as the kernel runs elsewhere.
        assert km.transport == "ipc" and Path(km.ip).is_absolute()
        first_sockets = km.ip
        first = _run(km, "import os, json\nleft_over = 41\nprint(os.getpid(), os.getcwd())")
        assert len(glob.glob(first_sockets + "-*")) == 5  # bound once the kernel answers
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

        # The heap a stage freed goes back to the system before the next stage allocates (a
        # 60-minute run's kernel peaked at 2.6 GiB holding stage 01's freed heap into stage 03):
        # 200 MB in 4 KB blocks, freed but for one held where the reset does not look (so the
        # heap's top stays in use and free() alone returns nothing), then the next notebook.
        rss = "int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 2**20"
        km = kernel.manager()
        code = "import os, sys\nblocks = [bytes(4096) for _ in range(50_000)]\nsys._pin = bytes(4096)\n"
        code += "del blocks"
        held = int(_run(km, f"{code}\nprint({rss})"))
        km = kernel.manager()
        after = int(_run(km, f"import os\nprint({rss})"))
        assert held - after > 150, (held, after)

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
    assert not glob.glob(first_sockets + "-*"), "a killed kernel's socket files are removed"
    assert not glob.glob(replacement.ip + "-*")
    kernel.close()  # closing twice is harmless


def test_kernel_sockets_fall_back_to_tcp_where_the_temporary_folder_is_too_long(monkeypatch, tmp_path):
    assert _kernel_sockets()["transport"] == "ipc"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("x" * 90)))
    assert _kernel_sockets() == {}


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


def test_a_kernel_start_interrupted_before_its_launch_returned_leaves_no_kernel(monkeypatch):
    """An interrupt (Ctrl-C, SIGTERM raised as one) landing after the kernel's fork and before
    ``Popen`` returned: the manager never learnt of the process, so closing did nothing and the
    kernel ran on until it noticed its parent gone, seconds later under load (a CI failure)."""
    import psutil
    from jupyter_client.provisioning import local_provisioner

    launched: list[psutil.Process] = []
    launch = local_provisioner.launch_kernel

    def interrupted(cmd, **kwargs):
        launched.append(psutil.Process(launch(cmd, **kwargs).pid))
        raise KeyboardInterrupt

    monkeypatch.setattr(local_provisioner, "launch_kernel", interrupted)
    kernel = StageKernel("python3")
    with pytest.raises(KeyboardInterrupt):
        kernel.start()
    [process] = launched
    assert process.is_running() and not kernel._km.has_kernel  # running, and unknown to its manager
    connection = Path(kernel._km.connection_file)
    assert connection.is_file()
    kernel.close()
    assert not process.is_running()  # ended and reaped, not left to ipykernel's parent poll
    assert not connection.exists()  # nor its connection file left for a later run to sweep
    assert kernel._km is None


def _slow_kernel(folder) -> None:
    """A Jupyter kernel named ``slow``: the project's ipykernel, started 3 s after its process (a
    cold machine: the first import of ipykernel, IPython and zmq compiled from source)."""
    import json
    import sys

    spec = folder / "kernels" / "slow"
    spec.mkdir(parents=True)
    start = (
        "import runpy, sys, time; time.sleep(3); sys.argv = ['ipykernel_launcher', *sys.argv[1:]]; "
        "runpy.run_module('ipykernel_launcher', run_name='__main__')"
    )
    argv = [sys.executable, "-c", start, "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "slow", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))


def test_a_slow_starting_kernel_is_waited_for(tmp_path, monkeypatch):
    """The runner's way (papermill handed the shared kernel's manager: start, then reset and
    reuse) and this module's client both wait for a kernel that answers nothing for 3 s."""
    import nbformat
    import papermill

    _slow_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    source = tmp_path / "nb.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nprint(6 * 7, os.getpid())")])
    nb.metadata["kernelspec"] = {"name": "slow", "display_name": "slow", "language": "python"}
    nbformat.write(nb, source)
    kernel = StageKernel("slow")
    try:
        pids = []
        for i in range(2):
            target = tmp_path / f"out{i}.ipynb"
            papermill.execute_notebook(
                str(source), str(target), kernel_name="slow", km=kernel.manager(), progress_bar=False
            )
            text = nbformat.read(target, as_version=4).cells[0].outputs[0]["text"].split()
            assert text[0] == "42"
            pids.append(text[1])
        assert pids[0] == pids[1] and not kernel.fresh  # the second notebook reused the kernel
        assert _run(kernel.manager(), "print(6 * 7)").strip() == "42"
    finally:
        kernel.close()


def test_a_kernel_started_ahead_imports_the_first_notebooks_modules_and_nothing_else():
    """The run's kernel imports what its first notebook will (so the imports overlap the run's own
    checks, and the figures' ones the stage): the modules load, no name is left in the notebook's
    namespace, and a module that does not import leaves the error to the notebook and the kernel
    starting."""
    from diffusion_bunny.pipeline.runner import warm_modules
    from diffusion_bunny.stages import PIPELINE

    before, after = warm_modules(PIPELINE, "extract")
    # the stage's own code before it; notebook 01 imports its figures' module after the stage
    assert "diffusion_bunny.stages.extract.stage" in before and "diffusion_bunny.stages" in before
    assert "diffusion_bunny.stages.extract.plots" in after and not set(before) & set(after)
    assert "polars" in warm_modules(PIPELINE, "scenes")[0]  # `import polars as pl` counts as well
    kernel = StageKernel("python3")
    try:
        kernel.start(["colorsys", "no_such_module_here"], ["plotnine"])
        km = kernel.manager()
        probe = (
            "import sys, threading\n"
            "[t.join() for t in threading.enumerate() if t.name == 'bunny-warm']\n"
            "print(sorted(m for m in ('colorsys', 'plotnine', 'matplotlib.pyplot', 'no_such_module_here')"
            " if m in sys.modules))\n"
            "print(sorted(k for k in get_ipython().user_ns if 'warm' in k or k in ('colorsys', 'plotnine')))"
        )
        loaded, names = _run(km, probe).strip().splitlines()
        # plotnine draws its first figure with pyplot: imported ahead with it
        assert loaded == "['colorsys', 'matplotlib.pyplot', 'plotnine']"
        assert names == "[]"
    finally:
        kernel.close()


_KILLED_RUN = """
import glob, sys, time
from jupyter_core.utils import run_sync
from diffusion_bunny.pipeline.runner import StageKernel
kernel = StageKernel("python3")
kernel.start()
km = kernel.manager()
kc = km.client()
kc.start_channels()
run_sync(kc.wait_for_ready)(timeout=120)
print(km.ip, km.provisioner.pgid, km.connection_file, flush=True)
time.sleep(600)
"""


def test_the_sockets_of_a_kernel_whose_run_was_killed_are_removed_by_the_next_run(tmp_path):
    """A run killed outright (SIGKILL; a Ray task cancelled with its worker) cannot remove its
    kernel's socket files: the next kernel started on the machine removes them, and only
    those of runs that are gone."""
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-c", _KILLED_RUN], stdout=subprocess.PIPE, text=True)
    try:
        base, pgid, connection = run.stdout.readline().split()
    finally:
        run.kill()
        run.wait()
    with contextlib.suppress(ProcessLookupError):  # its kernel follows its parent within a second
        os.killpg(int(pgid), signal.SIGKILL)
    assert Path(base).name.startswith(f"bunny-kernel-{run.pid}-")
    assert len(glob.glob(base + "-*")) == 5  # left behind
    # With the kernel's key: a tmpXXXX.json of jupyter_client's was left by every hard kill.
    assert Path(connection).name == Path(base).name.removesuffix("-ipc") + ".json"
    assert Path(connection).is_file()

    ours = _kernel_sockets()["ip"]  # a live run's (this process's) name, not yet bound
    assert Path(ours).name.startswith(f"bunny-kernel-{os.getpid()}-")
    assert glob.glob(base + "-*") == [] and not Path(connection).exists()
    live = Path(ours + "-1")
    live.touch()  # a live run's file stays, as does anything not named like a kernel's socket
    other = Path(tempfile.gettempdir()) / f"bunny-kernel-{run.pid}-notes.txt"
    other.touch()
    try:
        _kernel_sockets()
        assert live.exists() and other.exists()
    finally:
        live.unlink()
        other.unlink()


def test_a_relative_cache_folder_means_where_bunny_was_typed(tmp_path, monkeypatch):
    """``HF_HOME=hfcache bunny run ...``: the stages run in a kernel whose working folder is the
    notebooks' one, which read the value as ``notebook/hfcache`` (a model in ``./hfcache`` was
    "not in the local Hugging Face cache", and a download would have gone into the checkout).
    The command makes such a value absolute before any kernel starts."""
    from diffusion_bunny import cli
    from diffusion_bunny.paths import absolute_path_variables

    env = {"HF_HOME": "~/hf", "TORCH_HOME": "/abs/torch", "XDG_CACHE_HOME": "", "HF_HUB_CACHE": "c/hub"}
    assert absolute_path_variables(env) == ["HF_HUB_CACHE"]  # ~ is the user's home to every library
    assert env["HF_HOME"] == "~/hf" and env["TORCH_HOME"] == "/abs/torch"
    assert env["HF_HUB_CACHE"] == os.path.join(os.getcwd(), "c", "hub") and env["XDG_CACHE_HOME"] == ""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", "hfcache")
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", "bunnycache")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cli.main(["status", "-q", str(tmp_path)])  # any command
    assert os.environ["HF_HOME"] == str(tmp_path / "hfcache")
    assert os.environ["DIFFUSION_BUNNY_CACHE"] == str(tmp_path / "bunnycache")
    kernel = StageKernel("python3")
    try:
        kernel.start()  # as `bunny run` starts it, from the command's environment
        code = "import huggingface_hub.constants as c\nprint(c.HF_HUB_CACHE)"
        assert _run(kernel._km, code).strip() == str(tmp_path / "hfcache" / "hub")
    finally:
        kernel.close()
