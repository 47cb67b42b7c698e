#!/usr/bin/env python3
"""Writes a gpt-oss checkpoint in the Hugging Face layout (config.json, tokenizer.json, sharded
safetensors with MXFP4 experts) as a GGUF file that llama.cpp loads, for the side-by-side decode
benchmark (compare.sh). It stands in for llama.cpp's own converter, whose Python stack (PyTorch,
transformers) is not installable here, and writes what that converter writes for this model:

- dense matrices (q/k/v/o, embedding, lm_head) in bf16, as in the checkpoint (no rounding);
- norms, biases, attention sinks and the router in f32;
- experts in ggml's MXFP4 blocks (one e8m0 scale byte, then 16 bytes whose low nibbles are values
  0..15 and high nibbles values 16..31), gate and up split from the interleaved gate_up rows;
- the o200k vocabulary as a gpt2-style BPE (tokens, types, merges, pre-tokenizer "gpt-4o").

Tensors are streamed one at a time (a 24-layer checkpoint is 13 GB) and 64-byte aligned in the file.
Needs numpy and the gguf package from the llama.cpp tree (PYTHONPATH=<llama.cpp>/gguf-py).

Usage: to_gguf.py CHECKPOINT_DIR OUT.gguf [--layers N]  (N: keep only the first N layers)
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

import gguf


class Checkpoint:
    """The tensors of a sharded safetensors checkpoint, as numpy views of memory-mapped files."""

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self.where = {}
        for name in files:
            path = root / name
            with open(path, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len))
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
            for key, info in header.items():
                if key != "__metadata__":
                    self.where[key] = (data, info)

    def get(self, name: str) -> np.ndarray:
        data, info = self.where[name]
        begin, end = info["data_offsets"]
        dtype = {"BF16": np.uint16, "U8": np.uint8, "F32": np.float32}[info["dtype"]]
        return data[begin:end].view(dtype).reshape(info["shape"])


def to_f32(a: np.ndarray) -> np.ndarray:
    """bf16 (read as uint16) or f32 values as f32."""
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)


def ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF blocks [..., G, 16] (byte j: value 2j low nibble, 2j+1 high) and scales [..., G] ->
    ggml blocks [..., G * 17] (scale byte, then byte j: value j low nibble, j + 16 high)."""
    values = np.empty(blocks.shape[:-1] + (32,), dtype=np.uint8)
    values[..., 0::2] = blocks & 0x0F
    values[..., 1::2] = blocks >> 4
    out = np.empty(blocks.shape[:-1] + (17,), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = values[..., :16] | (values[..., 16:] << 4)
    return out.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 17,))


def vocab(root: Path, vocab_size: int):
    tok = json.loads((root / "tokenizer.json").read_text())
    model = tok["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special.get(i) else gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads((args.checkpoint / "config.json").read_text())
    layers = cfg["num_hidden_layers"] if args.layers <= 0 else min(args.layers, cfg["num_hidden_layers"])
    ck = Checkpoint(args.checkpoint)

    arch = "gpt-oss"
    w = gguf.GGUFWriter(None, arch)
    w.data_alignment = 64
    w.add_custom_alignment(64)
    w.add_block_count(layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    rope = cfg["rope_scaling"]
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    tokens, types, merges = vocab(args.checkpoint, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|startoftext|>"))
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])

    # (gguf name, producer, raw dtype or None, (shape, dtype) it will produce): producers run once,
    # in this order, while writing; the header needs the shapes before any data.
    plan = []

    def dense(name, hf):
        a = ck.get(hf)
        plan.append((name, lambda: ck.get(hf), gguf.GGMLQuantizationType.BF16, (a.shape, a.dtype)))

    def f32(name, hf, pick=None):
        def make():
            return np.ascontiguousarray(to_f32(ck.get(hf) if pick is None else pick(ck.get(hf))))
        plan.append((name, make, None, (make().shape, np.dtype(np.float32))))  # small tensors

    def experts(name, blocks, scales, halves=None):
        e, rows, groups, _ = ck.get(blocks).shape
        def make():
            b, s = ck.get(blocks), ck.get(scales)
            if halves is not None:
                b, s = b[:, halves::2], s[:, halves::2]
            return ggml_mxfp4(b, s)
        shape = (e, rows // 2 if halves is not None else rows, groups * 17)
        plan.append((name, make, gguf.GGMLQuantizationType.MXFP4, (shape, np.dtype(np.uint8))))

    dense("token_embd.weight", "model.embed_tokens.weight")
    f32("output_norm.weight", "model.norm.weight")
    dense("output.weight", "lm_head.weight")
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        f32(b + "attn_norm.weight", p + "input_layernorm.weight")
        f32(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight")
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            dense(b + g + ".weight", p + f"self_attn.{h}.weight")
            f32(b + g + ".bias", p + f"self_attn.{h}.bias")
        f32(b + "attn_sinks.weight", p + "self_attn.sinks")
        f32(b + "ffn_gate_inp.weight", p + "mlp.router.weight")
        f32(b + "ffn_gate_inp.bias", p + "mlp.router.bias")
        e = p + "mlp.experts."
        experts(b + "ffn_gate_exps.weight", e + "gate_up_proj_blocks", e + "gate_up_proj_scales", 0)
        experts(b + "ffn_up_exps.weight", e + "gate_up_proj_blocks", e + "gate_up_proj_scales", 1)
        experts(b + "ffn_down_exps.weight", e + "down_proj_blocks", e + "down_proj_scales")
        f32(b + "ffn_gate_exps.bias", e + "gate_up_proj_bias", lambda a: a[:, 0::2])
        f32(b + "ffn_up_exps.bias", e + "gate_up_proj_bias", lambda a: a[:, 1::2])
        f32(b + "ffn_down_exps.bias", e + "down_proj_bias")

    for name, _, raw, (shape, dtype) in plan:
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=raw)
    w.write_header_to_file(args.out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n, (name, make, _, (shape, _)) in enumerate(plan):
        a = make()
        assert a.shape == tuple(shape), (name, a.shape, shape)
        w.write_tensor_data(a)
        print(f"\r{n + 1}/{len(plan)} {name}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
