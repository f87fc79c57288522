"""HF export of an OPT-1.3B-shaped checkpoint: wall time and peak RSS of the exporting process.

Writes a DCP checkpoint of OPT-1.3B's shape (24 x 2048, vocab 50272: 1.3B fp32 weights, 5.3 GB;
weights only, no optimizer moments) through the real `CheckpointManager`, then exports it in a
fresh process each time:

- `stream`: `opt_train.model.hf.export_checkpoint`, which reads the checkpoint one weight file at a
  time (in DCP loads of at most 1 GB of fp32) and writes it in `export.dtype`;
- `whole model` (the baseline, what the export did before): build the model, load the whole
  checkpoint into it with DCP, then write it with `save_hf`.

Each child reports its own `ru_maxrss`. The checkpoint is read back from the page cache after
the first run (it was just written), so the times are CPU and write bound, not disk-read bound.

    python benchmarks/export.py [--dir /tmp] [--shard-sizes 5GB,1GB] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # benchmarks/tokenize.py would shadow the standard library's tokenize


def make_checkpoint(root: Path) -> Path:
    """A 1.3B-shaped model's weights as step 1 of a run under `root/run`, and a tiny GPT-2
    shard set (its manifest names the tokenizer the export writes)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from data_pipeline.shards import ShardWriter
    from data_pipeline.tokenizer import Tokenizer, TokenizerSpec
    from opt_train.checkpoint.manager import CheckpointManager
    from opt_train.checkpoint.weights import DCPWeights
    from opt_train.config import CheckpointConfig
    from opt_train.model.opt import OPT
    from tests.opt_train.conftest import make_config

    tok = Tokenizer(TokenizerSpec("gpt2"))
    with ShardWriter(root / "shards", tok.describe()) as w:
        w.add(tok.encode("After Monday comes Tuesday."), "train")
    cfg = make_config("+model=opt-1.3b", f"run_dir={root / 'run'}", f"data.path={root / 'shards'}")
    with torch.device("meta"):
        model = OPT(cfg.model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)

    class ModelOnly(DCPWeights):
        def write(self, tmp, group, asynchronous):
            dcp.save({"model": model.state_dict()}, checkpoint_id=tmp, no_dist=True)

    mgr = CheckpointManager(root / "run" / "checkpoints", CheckpointConfig(async_save=False), None)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return mgr.save(1, ModelOnly(model, None), {"step": 1}, yaml, blocking=True)


def child(mode: str, ckpt: str, out: str, dtype: str, shard: str) -> None:
    t0 = time.perf_counter()
    overrides = [f"export.dtype={dtype}", f"export.max_shard_size={shard}"]
    if mode == "stream":
        from opt_train.tools.hf_export import export_checkpoint

        export_checkpoint(ckpt, out, overrides)
    else:
        import torch
        import torch.distributed.checkpoint as dcp
        from omegaconf import OmegaConf

        from data_pipeline.shards import read_manifest
        from opt_train.config import ExportConfig, JobConfig
        from opt_train.model.opt import OPT
        from opt_train.tools.hf_export import save_hf

        raw = OmegaConf.merge(
            OmegaConf.structured(JobConfig), OmegaConf.load(f"{ckpt}/config.yaml")
        )
        cfg = OmegaConf.to_object(raw)
        with torch.device("meta"):
            model = OPT(cfg.model)
        model.to_empty(device="cpu")
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
        tokenizer = read_manifest(cfg.data.path)["tokenizer"]
        save_hf(model, cfg.model, out, tokenizer, ExportConfig(dtype=dtype, max_shard_size=shard))
    wall = time.perf_counter() - t0
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    files = sorted(p.name for p in Path(out).glob("*.safetensors"))
    out_gb = sum(p.stat().st_size for p in Path(out).glob("*.safetensors")) / 1e9
    print(json.dumps({"wall_s": wall, "peak_rss_gib": rss_gib, "files": len(files), "gb": out_gb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--shard-sizes", default="5GB,1GB")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make:
        print(make_checkpoint(Path(args.make)))
        return
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="export-bench-"))
    try:
        # In a child too: this process stays small while the measured ones run.
        t0 = time.perf_counter()
        made = subprocess.run(
            [sys.executable, __file__, "--make", str(root)], capture_output=True, text=True
        )
        if made.returncode:
            raise SystemExit(made.stderr[-3000:])
        ckpt = made.stdout.strip().splitlines()[-1]
        print(f"checkpoint: {time.perf_counter() - t0:.1f} s, {ckpt}", flush=True)
        rows = []
        for shard in args.shard_sizes.split(","):
            for mode in ("stream", "whole"):
                out = root / f"hf-{mode}-{shard}"
                r = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        str(ckpt),
                        str(out),
                        args.dtype,
                        shard,
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if r.returncode:
                    raise SystemExit(r.stderr[-3000:])
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append((mode, shard, row))
                print(
                    f"{mode:>6} {args.dtype} max_shard_size={shard:>4}: {row['wall_s']:6.1f} s, "
                    f"peak RSS {row['peak_rss_gib']:5.2f} GiB, {row['files']} file(s), "
                    f"{row['gb']:.2f} GB",
                    flush=True,
                )
                shutil.rmtree(out)
        for shard in args.shard_sizes.split(","):
            by_mode = {m: r for m, s, r in rows if s == shard}
            whole, stream = by_mode["whole"], by_mode["stream"]
            print(
                f"max_shard_size={shard}: stream/whole peak RSS "
                f"{stream['peak_rss_gib'] / whole['peak_rss_gib']:.2f}x, "
                f"wall {stream['wall_s'] / whole['wall_s']:.2f}x"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
