"""`vistune import` and `vistune export`: checkpoints in other formats."""
from __future__ import annotations

import argparse
import sys

_DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser(
        "import", help="convert an original LLaVA or llava-hf checkpoint into a vistune model directory",
        description="Formats are detected from the files (see docs/interop.md): original LLaVA full models, "
                    "stage-1 mm_projector.bin (with --base), LoRA folders with non_lora_trainables.bin "
                    "(merged; with --base), and llava-hf (LlavaForConditionalGeneration) directories.",
    )
    imp.add_argument("src", help="checkpoint directory, or an mm_projector.bin file")
    imp.add_argument("--out", required=True, help="vistune model directory to write")
    imp.add_argument("--from", dest="source", choices=["llava", "llava-hf", "minigpt4"], default=None,
                     help="assert the source family (default: detect; minigpt4 is never detected: name it, with "
                          "--blip2 and --base)")
    imp.add_argument("--blip2", default=None,
                     help="minigpt4: the BLIP-2 directory (transformers layout) giving the tower and Q-Former")
    imp.add_argument("--vision-tower", default=None,
                     help="local CLIP vision (or whole CLIP) checkpoint dir; original LLaVA does not store it")
    imp.add_argument("--base", default=None,
                     help="base LLM dir for projector-only and LoRA checkpoints (minigpt4: the Vicuna directory)")
    imp.add_argument("--template", default=None,
                     help="conversation template (default: vicuna_v1 for LLaVA v1/v1.5, plain for stage-1 "
                          "projectors, the chat template's for llava-hf)")
    imp.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="cast the whole model (default: keep the checkpoint's dtypes)")
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser(
        "export", help="write a vistune model in another format (llava-hf, or GGUF for llama.cpp)",
        description="llava-hf: a transformers LlavaForConditionalGeneration directory (transformers, vLLM). "
                    "gguf: the language model and the mmproj (vision tower + projector) files that llama.cpp's "
                    "llama-mtmd-cli and llama-server --mmproj run (see docs/interop.md). A LoRA run exports "
                    "with its adapters merged.",
    )
    exp.add_argument("model", help="vistune model directory (or a LoRA run directory)")
    exp.add_argument("--format", default="llava-hf", choices=["llava-hf", "gguf"])
    exp.add_argument("--out", required=True, help="directory to write")
    exp.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                     help="gguf: storage type of the weight matrices (vectors stay float32; default f16)")
    exp.add_argument("--key-layout", choices=["old", "new"], default="old",
                     help="old: the Hub's llava-hf key names (read by every transformers and vLLM); "
                          "new: transformers >= 4.52 names (model.language_model.*)")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    import torch

    from ..interop import InteropError, import_checkpoint

    try:
        imported = import_checkpoint(
            args.src, args.out, source=args.source, vision_tower=args.vision_tower, base=args.base,
            template=args.template, dtype=getattr(torch, args.dtype) if args.dtype else None, blip2=args.blip2,
        )
    except (InteropError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = imported.model
    n = sum(p.numel() for p in m.parameters())
    for note in imported.notes:
        print(f"  {note}")
    print(f"imported {imported.kind} -> {args.out}: {n / 1e6:.2f}M parameters, template "
          f"{m.config.template if isinstance(m.config.template, str) else 'custom'}, projector "
          f"{m.config.projector_type}, {m.config.num_image_tokens} image tokens"
          f"{' per tile' if m.config.image.aspect == 'anyres' else ''} (id {m.image_token_id}), "
          f"images {m.config.image.aspect} {m.config.image.size}px")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..interop import InteropError, export_checkpoint

    try:
        out = export_checkpoint(args.model, args.out, format=args.format, key_layout=args.key_layout,
                                max_shard_size=args.max_shard_size, outtype=args.outtype)
    except (InteropError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.format == "gguf":
        print(f"exported {args.model} -> {args.out} (gguf, {args.outtype})")
        print(f"  language model: {out.llm}")
        print(f"  mmproj:         {out.mmproj}")
        for note in out.notes:
            print(f"  note: {note}")
        print(f"  run:   llama-mtmd-cli -m {out.llm} --mmproj {out.mmproj} --image IMAGE -p 'QUESTION'")
        print(f"  serve: llama-server -m {out.llm} --mmproj {out.mmproj} --jinja")
        return 0
    print(f"exported {args.model} -> {out} ({args.format}, {args.key_layout} key layout)")
    print(f"  load: LlavaForConditionalGeneration.from_pretrained({str(out)!r}); AutoProcessor.from_pretrained(...)")
    print(f"  serve: vllm serve {out}")
    return 0
