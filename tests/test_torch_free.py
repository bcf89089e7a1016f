"""The runtime must import and run with torch absent: a subprocess whose import system refuses
torch (and pianolm.export, which is the torch side)."""

import shutil
import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + '.') for b in BLOCKED):
                raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
    sys.meta_path.insert(0, Refuse())
""")


def _run(code: str, blocked=("torch", "pianolm.export")) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=tuple(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def test_blocker_really_blocks_torch():
    res = _run("import torch")
    assert res.returncode != 0 and "blocked: torch" in res.stderr


def test_every_runtime_module_imports_without_torch():
    res = _run("""
        import pkgutil, importlib, sys
        import pianolm.runtime as rt
        names = [m.name for m in pkgutil.iter_modules(rt.__path__)]
        assert 'decode' in names and 'vocab' in names, names
        for name in names:
            importlib.import_module(f'pianolm.runtime.{name}')
        assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)
        print('ok', len(names))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


def test_decode_loop_runs_without_torch():
    res = _run("""
        import numpy as np, sys
        sys.path.insert(0, '.')
        from tests.fake_backend import FakeBackend
        from pianolm.runtime.decode import RowSpec, decode_batch
        audio = np.random.default_rng(0).normal(size=(2, 160000)).astype(np.float32)
        out = decode_batch(FakeBackend(), audio, [RowSpec(0), RowSpec(1, 0)], max_notes=4)
        print(len(out))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2"


@pytest.mark.parametrize("argv", [["info", "--preset", "tiny"], ["train", "--help"],
                                  ["train", "lm", "--help"], ["bench", "--help"]])
def test_torch_side_command_says_which_extra_to_install(argv):
    # train and bench import torch only when they build their parsers, after the CLI's import
    res = _run(f"""
        from pianolm.runtime.cli import main
        raise SystemExit(main({argv!r}))
    """, blocked=("torch",))
    assert res.returncode == 2
    assert "pip install 'pianolm[export]'" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flags, code", [(["--commands-only"], 0), ([], 2)])
def test_build_engines_needs_neither_torch_nor_onnx(tmp_path, flags, code):
    """The GPU server's install (runtime, the gpu extra, TensorRT; no torch, no onnx): the
    scripts are written and the onnx-based check says it was skipped; here, with TensorRT
    absent too, the build then says what to install."""
    from pianolm.runtime.transcriber import default_model_dir

    folder = tmp_path / "model"  # the shipped export, its graphs linked, not copied
    folder.mkdir()
    for f in default_model_dir().iterdir():
        if f.name.endswith(".onnx"):
            (folder / f.name).symlink_to(f)
        else:
            shutil.copy(f, folder)
    res = _run(f"""
        import sys
        from pianolm.runtime.cli import main
        code = main(['build-engines', {str(folder)!r}, *{flags!r}])
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tensorrt'))
        assert not heavy, heavy
        raise SystemExit(code)
    """, blocked=("torch", "onnx", "tensorrt"))
    print(res.stdout, res.stderr)
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == ("TensorRT check: skipped (needs onnx, not installed here: pip install "
                        f"'pianolm[export]', or run `pianolm build-engines {folder} "
                        "--commands-only` where the model was exported)")
    assert not any("graphs ok" in line for line in lines)
    assert "trtexec --onnx=onset_step.onnx" in (folder / "trtexec.sh").read_text()
    assert "polygraphy run onset_step.onnx" in (folder / "polygraphy.sh").read_text()
    if code:  # no TensorRT: the gpu extra and NVIDIA's index, not the torch side
        assert "pip install 'pianolm[gpu]'" in res.stderr and "tensorrt-cu12" in res.stderr
        assert "pianolm[export]" not in res.stderr
