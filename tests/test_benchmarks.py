"""The step benchmarks run end to end on their tiny configurations (one repeat):
the JSON has its keys, and where the peer is installed its step-0 loss equals
mmjax's. The numbers themselves are not checked (a shared CPU's timings vary).
A partial run does not replace the benchmark's results file; a default one
names it by the machine kind."""

import argparse
import importlib.util
import json

import pytest

from benchmarks import (attention, clip_step, common, compile as compile_bench, gpu, llava_step,
                        matmul, roofline as roofline_bench)

pytestmark = pytest.mark.slow

KEYS = ("mmjax_examples_per_sec", "peer_examples_per_sec", "ratio", "achieved_flops_per_sec",
        "matmul_peak_flops_per_sec", "fraction_of_peak")
FAST = ["--configs=tiny", "--repeats=1", "--steps=1", "--warmup=1"]


def _row(path, name="tiny"):
  with open(path) as f:
    results = json.load(f)
  assert results["machine"]["cpus"] >= 1
  row = results["configs"][name]
  assert set(KEYS) <= set(row)
  assert row["mmjax_examples_per_sec"] > 0 and row["achieved_flops_per_sec"] > 0
  assert 0 < row["fraction_of_peak"] and row["matmul_peak_flops_per_sec"] > 0
  return row


def test_clip_step_tiny(tmp_path):
  out = tmp_path / "clip.json"
  clip_step.main([*FAST, f"--out={out}"])
  row = _row(out)
  if importlib.util.find_spec("open_clip") is None:
    # CI has no open_clip: the peer is skipped, said so, and its numbers are null.
    assert row["peer_examples_per_sec"] is None and row["ratio"] is None
    assert "open_clip not importable" in row["note"]
  else:
    assert row["ratio"] > 0
    assert row["loss_difference_at_step_0"] < 1e-4


def test_llava_step_tiny_against_transformers(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "llava.json"
  llava_step.main([*FAST, f"--out={out}"])
  row = _row(out)
  assert row["ratio"] > 0
  assert row["loss_difference_at_step_0"] < 1e-4


def test_compile_reports_time_and_memory(tmp_path):
  out = tmp_path / "compile.json"
  r = compile_bench.main(["--variant=tiny/8", "--text=tiny", "--embed_dim=32",
                          "--image_size=32", "--batch=4", f"--out={out}"])
  assert r["compile_s"] > 0 and r["peak_rss_mib"] >= r["rss_before_mib"] > 0
  assert json.load(open(out))["scan"] is True


def test_gpu_script_smoke_on_cpu(tmp_path):
  out = tmp_path / "gpu.json"
  r = gpu.main(["--smoke", "--steps=1", f"--out={out}"])
  for name in ("clip", "llava"):
    assert r[name]["finite"] and r[name]["examples_per_sec"] > 0 and r[name]["mfu"] > 0
  assert r["clip"]["batch"] == gpu.SMOKE_CLIP_BATCHES[0]


def test_attention_benchmark_tiny(tmp_path):
  out = tmp_path / "attention.json"
  attention.main(["--shapes=tiny", "--repeats=1", "--warmup=1", f"--out={out}"])
  row = json.load(open(out))["shapes"]["tiny"]
  assert row["max_abs_difference_from_xla"] < 1e-5
  assert row["xla_over_ours_fwd"] > 0 and row["xla_over_ours_fwd+bwd"] > 0
  assert all(ms > 0 for ms in row["median_ms"].values())


def test_roofline_benchmark_predicts_and_measures_the_cpu_step(tmp_path):
  out = tmp_path / "roofline.json"
  roofline_bench.main(["--configs=tiny", "--repeats=1", "--steps=1", "--warmup=1",
                       f"--out={out}"])
  [r] = json.load(open(out))["rows"]
  assert r["bound"] in ("compute", "hbm") and r["predicted_step_s"] == max(r["predicted"].values())
  assert r["measured_step_s"] > 0 and r["hbm_bytes"] > 0
  assert r["step_flops"] > 0.5 * r["model_flops"]
  assert r["measured_over_predicted"] == pytest.approx(r["measured_step_s"] / r["predicted_step_s"])


def test_matmul_benchmark_tiny(tmp_path):
  out = tmp_path / "matmul.json"
  matmul.main(["--shapes=tiny", "--repeats=1", "--warmup=1", f"--out={out}"])
  r = json.load(open(out))["shapes"]["tiny"]
  assert len(r["products"]) == 15  # 3 per dense layer (q/k/v, out, fc1, fc2), 3 in attention
  fc1 = next(p for p in r["products"] if p["product"] == "fc1 x W")
  assert fc1["flops"] == 2 * (2 * 17) * 16 * 64
  assert r["total"]["flops"] == sum(p["flops"] for p in r["products"])
  assert all(p["xla_ms"] > 0 for p in r["products"])
  if importlib.util.find_spec("torch") is not None:
    assert all(p["relative_difference"] < 1e-5 for p in r["products"])
    assert r["total"]["torch_over_xla"] > 0


def test_results_files_are_named_by_benchmark_and_machine_kind(tmp_path, monkeypatch, capsys):
  epyc = {"device": "cpu", "cpus": 2, "processor": "AMD EPYC 7B13 64-Core Processor",
          "vector_isa": ["avx2", "fma"]}
  assert common.machine_kind(epyc) == "cpu2-amd-epyc-7b13-avx2"
  xeon = dict(epyc, processor="Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
              vector_isa=["avx2", "avx512f", "amx_tile"])
  assert common.machine_kind(xeon) == "cpu2-intel-xeon-platinum-8481c-avx512"
  assert common.machine_kind({"device": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
  monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
  results = {"benchmark": "x", "machine": epyc}
  assert common.save("x", results, None, complete=False) is None  # a partial run: not kept
  assert "not saved" in capsys.readouterr().out and not list(tmp_path.iterdir())
  path = common.save("x", results, None, complete=True)
  assert path == str(tmp_path / "x_cpu2-amd-epyc-7b13-avx2.json")
  assert json.load(open(path)) == results
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="small,tiny")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None)
  assert common.is_default_run(parser, parser.parse_args(["--repeats=2", "--out=f"]))
  assert not common.is_default_run(parser, parser.parse_args(["--configs=tiny"]))


def test_the_docs_tables_are_made_from_the_results_files(tmp_path, monkeypatch):
  from benchmarks import tables
  # docs/performance.md holds what `python -m benchmarks.tables` makes of results/
  assert tables.main(["--check"]) == 0
  # a results file changes the table between its markers, and only there
  monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
  row = {"name": "small", "batch": 32, "peer": "open_clip", "mmjax_examples_per_sec": 3.0,
         "peer_examples_per_sec": 2.0, "ratio": 1.5, "fraction_of_peak": 0.6,
         "loss_difference_at_step_0": 0.0}
  machine = {"device": "cpu", "cpus": 2, "processor": "AMD EPYC", "vector_isa": ["avx2"],
             "date": "2026-12-08"}
  common.save("clip_step", {"benchmark": "clip_step", "machine": machine,
                            "configs": {"small": row}}, None, complete=True)
  text = "intro\n<!-- results:clip_step -->\nold\n<!-- /results:clip_step -->\nend\n"
  new = tables.render(text, tables.load(str(tmp_path)))
  assert new.startswith("intro\n<!-- results:clip_step -->\n| machine, date |")
  assert "| cpu2-amd-epyc-avx2, 2026-12-08 | small | 32 | 3 | 2 | **1.50x** | 60% |" in new
  assert "old" not in new and new.endswith("<!-- /results:clip_step -->\nend\n")
  with pytest.raises(KeyError, match="no table for benchmark 'nope'"):
    tables.render("<!-- results:nope -->\n<!-- /results:nope -->", {})
