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
