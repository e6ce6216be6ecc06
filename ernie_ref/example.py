"""A first run: write a tiny ERNIE 4.5 MoE checkpoint, run the oracle, and compare with transformers.

    python -m ernie_ref.example
"""

from __future__ import annotations

import tempfile

import torch

from ernie_ref import ErnieMoeConfig, ErnieMoeForCausalLM, random_checkpoint


def main() -> None:
    cfg = ErnieMoeConfig.from_hf(
        dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
             moe_num_shared_experts=1, moe_layer_start_index=1)
    )
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(cfg, d, seed=0)
        trace = ErnieMoeForCausalLM.from_pretrained(d)(ids, trace=True)
        print(f"config: {cfg.one_line()}")
        for i, layer in enumerate(trace.layers):
            if layer.routing is not None:
                print(f"layer {i}: token 0 -> experts {layer.routing.expert_ids[0].tolist()} "
                      f"weights {[round(w, 4) for w in layer.routing.weights[0].tolist()]}")
        # transformers as a second opinion (ernie_ref imports no test machinery: this is its own check).
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = theirs(ids).logits
        error = (logits - trace.logits).abs().max() / trace.logits.abs().max()
        print(f"relative error of the oracle's logits against transformers: {error.item():.2e}")


if __name__ == "__main__":
    main()
