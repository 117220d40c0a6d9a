"""The package imports and runs on the reference backend even without the compiled extension."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_without_extension_uses_reference():
    code = ("import torch, hyperfused; assert not hyperfused.HAS_EXTENSION; "
            "assert hyperfused.available_backends() == ['reference'], hyperfused.available_backends(); "
            "m = hyperfused.HyperLSTM(3, 4, hyper_size=4, hyper_embed=2); out, (h, c) = m(torch.randn(2, 1, 3)); "
            "assert out.shape == (2, 1, 4)\n"
            "try:\n    hyperfused.HyperLSTM(3, 4, backend='cpu')\nexcept ValueError as e:\n"
            "    assert 'not available' in str(e) and \"['reference']\" in str(e), e\nelse:\n    raise SystemExit(1)")
    env = dict(os.environ, HYPERFUSED_NO_EXTENSION="1")
    env.pop("TRITON_INTERPRET", None)  # the interpreter would make 'triton' available on CPU
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_wheel_installs_the_triton_kernels_inside_hyperfused_only(tmp_path):
    """A top-level 'triton_kernels' would collide with Triton's own kernel library and a PyPI distribution."""
    import zipfile
    env = dict(os.environ, HYPERFUSED_NO_EXTENSION="1")  # packaging only: no compile
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", ROOT,
                        "-w", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("hyperfused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hyperfused/triton_kernels/hyper_lstm.py" in names
    assert "hyperfused/triton_kernels/workspace_layouts.def" in names  # read at run time (layouts.py)
    assert {n.split("/")[0] for n in names} == {"hyperfused", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}


def test_triton_kernels_never_import_the_rest_of_hyperfused():
    import ast
    folder = os.path.join(ROOT, "triton_kernels")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("hyperfused"), (name, ast.dump(node))
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("hyperfused") for a in node.names), (name, ast.dump(node))


def test_models_are_reachable_from_the_package():
    import hyperfused
    assert hyperfused.models.HyperMNISTNet is not None
