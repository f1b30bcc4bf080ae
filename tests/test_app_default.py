"""The offline default run, `python -m fqbench`, with every network connection refused and recorded.

The literal no-argument run trains the default model first (a couple of minutes on
two cores on a fresh machine), so the default suite runs it with a shorter training
schedule (`model.build.steps=2`, 32 calibration windows, one thread): the same corpus, model
architecture, method (FrameQuant, 2 bits, r = 1.1), FP baseline and output. The
literal run, training included, is the slow test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

NO_NETWORK = """
import os, socket
_log = os.environ["FQBENCH_TEST_NETWORK_LOG"]
def _refuse(*args, **kwargs):
    with open(_log, "a") as f:
        f.write(repr(args[1:] or args) + "\\n")
    raise OSError("network access refused by the offline test")
_connect = socket.socket.connect
def _connect_local_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(self, address)
    return _connect(self, address)
socket.socket.connect = _connect_local_only
socket.socket.connect_ex = _connect_local_only
socket.getaddrinfo = _refuse
"""


def run_offline(tmp_path: Path, *overrides: str) -> tuple[str, dict]:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    network_log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("FQBENCH_DATA", "HF_HOME", "WANDB_MODE")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")])),
               FQBENCH_TEST_NETWORK_LOG=str(network_log), FQBENCH_CACHE=str(tmp_path / "cache"),
               FQBENCH_RUNS=str(tmp_path / "runs"), HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "fqbench", *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not network_log.exists(), f"network use: {network_log.read_text()}"
    (path,) = (tmp_path / "runs").rglob("result.json")
    return result.stdout, json.loads(path.read_text())


def check(stdout: str, record: dict) -> None:
    assert record["status"] == "ok" and record["method"] == "framequant"
    assert record["choices"]["model"] == "pystdlib_llama"
    assert (record["config"]["method"]["bits"], record["config"]["method"]["redundancy"]) == (2, 1.1)
    fp, quantized = record["metrics"]["fp_pystdlib_ppl"], record["metrics"]["pystdlib_ppl"]
    assert 1 < fp < 258 and math.isfinite(quantized)  # below a uniform guess over 258 ids
    # Quantization happened (not a no-op) and kept the model close to full precision: 2-bit FrameQuant at
    # r = 1.1 measured 76.70 vs 76.71 after 2 training steps, 5.063 vs 4.875 on the fully trained model.
    assert quantized != fp and 0.9 * fp < quantized < 1.25 * fp
    assert record["nominal_bits"] == pytest.approx(2.2)
    assert record["bits_per_weight"] > 2 * 1.1 ** 2  # honest: both sides redundant, plus scales and zeros
    assert record["layers"] and record["config"]["data"]["root"] is None
    assert "python-stdlib" in record["calib_source"] and "heldout" in record["eval_sources"]["pystdlib"]
    assert "full precision" in stdout and "pystdlib_ppl" in stdout and "honest" in stdout
    assert f"{fp:.4g}" in stdout and f"{quantized:.4g}" in stdout


def test_default_run_offline_with_short_training(tmp_path):
    stdout, record = run_offline(tmp_path, "model.build.steps=2", "model.build.warmup=1", "calib.nsamples=32", "threads=1")
    check(stdout, record)


@pytest.mark.slow
def test_default_run_without_arguments(tmp_path):
    stdout, record = run_offline(tmp_path)
    check(stdout, record)
    (checkpoint,) = (tmp_path / "cache").glob("pystdlib-llama-*/fqbench_recipe.json")
    trained = json.loads(checkpoint.read_text())
    assert trained["heldout_loss"] < 2.2  # nats per byte (1.66 measured); a byte-unigram model gets ~3.1
    assert record["metrics"]["fp_pystdlib_ppl"] < 8  # 4.9 measured
    assert record["metrics"]["pystdlib_ppl"] > record["metrics"]["fp_pystdlib_ppl"]  # a trained model is hurt
