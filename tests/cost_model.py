"""A deterministic stand-in for measured times (seconds = multiply-adds x 1e-9, plus a per-call cost
for factored layers): speed budgets' logic is tested against it, real timings live in benchmarks/."""

from __future__ import annotations

from drone_hf import DroneLinear


class FlopLatency:
    """Seconds = multiply-adds x 1e-9 (+ a per-call cost), a stand-in for measured layer times."""

    def __init__(self, tokens, device=None, dtype=None, **kw):
        self.tokens = tokens

    def layer_times(self, out_f, in_f, ranks):
        call = 2e-7
        return self.tokens * out_f * in_f * 1e-9, {k: self.tokens * k * (out_f + in_f) * 1e-9 + call for k in ranks}


def fake_end_to_end(overhead: float, factored_scale: float = 1.0, compressed_extra: float = 0.0):
    """End-to-end times under the FLOP model; factored layers run ``factored_scale`` x their model time,
    and a model with any factored layer pays ``compressed_extra`` seconds more (a remainder the per-layer
    model cannot see; negative: less)."""

    def run(swapper, variants, inputs, repeats=9, warmup=2):
        out = {}
        for name, layers in variants.items():
            swapper.set(layers)
            total = overhead + (compressed_extra if layers else 0.0)
            tokens = inputs["input_ids"].numel()
            for full in swapper.dense:
                m = swapper.model.get_submodule(full)
                if isinstance(m, DroneLinear):
                    total += factored_scale * (tokens * m.rank * (m.in_features + m.out_features) * 1e-9 + 2e-7)
                else:
                    total += tokens * m.in_features * m.out_features * 1e-9
            out[name] = total
        swapper.set({})
        return out

    return run
