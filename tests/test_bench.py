"""Every benchmark runs end to end in its --quick mode and writes its JSON rows.

The timings of a smoke run mean nothing; what is checked is that the scripts still run against the
current API, that their correctness checks pass, and that each row carries its timings; and that
the CPU timer runs for as long as it is asked.
"""
import json
import time

import pytest

from bench import compiled, fused_vs_merged, lora_train_cpu, mixed_adapters, model_cpu
from bench.common import interleaved


def rows_of(path):
    return json.loads(path.read_text())["rows"]


def test_interleaved_runs_until_both_repeats_and_seconds():
    calls = {"a": 0, "b": 0}
    fns = {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}
    start = time.perf_counter()
    times = interleaved(fns, warmup=0, repeats=5, seconds=0.05)
    assert time.perf_counter() - start >= 0.05
    assert calls["a"] == calls["b"] > 5
    assert set(times) == {"a", "b"}


def test_fused_vs_merged_quick(tmp_path):
    fused_vs_merged.main(["--quick", "--out", str(tmp_path)])
    rows = rows_of(tmp_path / "fused_vs_merged_cpu.json")
    assert {r["pass_"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r[f"{name}_ms"][0] > 0 for r in rows for name in ("fused", "merged", "unfused"))


def test_mixed_adapters_quick(tmp_path):
    mixed_adapters.main(["--quick", "--out", str(tmp_path)])
    rows = rows_of(tmp_path / "mixed_adapters_cpu.json")
    assert sorted({r["adapters"] for r in rows}) == [1, 16]
    assert all(r[f"{name}_ms"][0] > 0 for r in rows for name in ("batched", "loop", "single"))


@pytest.mark.parametrize("bench", [model_cpu, lora_train_cpu], ids=["model_cpu", "lora_train_cpu"])
def test_against_transformers_and_peft_quick(tmp_path, bench):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    rows = bench.main(["--quick", "--threads", "1", "--repeats", "2", "--json", str(tmp_path / "out.json")])
    assert rows == rows_of(tmp_path / "out.json")


@pytest.mark.parametrize("model", ["gpt_neo", "bloom", "llama"])
def test_other_decoders_against_transformers_and_peft_quick(tmp_path, model):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = ["--model", model, "--quick", "--threads", "1", "--repeats", "2", "--json", str(tmp_path / "out.json")]
    rows = model_cpu.main(args)
    expected = ["prefill_tokens_per_s", "decode_ms_per_token", "load_ms"] + (["lora_train_step_ms"] if model == "llama" else [])
    assert [row["metric"] for row in rows] == expected and all(row["model"] == model for row in rows)
    assert rows == rows_of(tmp_path / "out.json")
    assert [row["impl"] for row in lora_train_cpu.main(args)] == ["ours", "peft"]


def test_compiled_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = ["--quick", "--threads", "1", "--repeats", "2", "--json", str(tmp_path / "out.json")]
    rows = compiled.main(args)
    assert rows == rows_of(tmp_path / "out.json")
    variants = ["ours eager", "ours compiled", "peft eager", "peft compiled"]
    assert [(r["workload"], r["variant"]) for r in rows] == [(w, v) for w in ("prefill", "decode", "train")
                                                              for v in variants]
    assert all(r["median_ms"] > 0 and r["graphs"] == ("compiled" in r["variant"]) for r in rows
               if r["variant"].startswith("ours"))  # ours compiled: one graph, no break
