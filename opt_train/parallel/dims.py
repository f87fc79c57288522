"""The mesh of a run: data-parallel replicate (HSDP) x data-parallel shard (FSDP) x tensor
parallel, validated against the world size and the model before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from opt_train.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world: int) -> ParallelDims:
        for key in ("tp", "dp_replicate"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(cfg, key)}")
        rest, rem = divmod(world, cfg.tp * cfg.dp_replicate)
        if rem:
            raise ValueError(
                f"world size {world} is not divisible by parallel.tp={cfg.tp} x "
                f"parallel.dp_replicate={cfg.dp_replicate}; launch a multiple of "
                f"{cfg.tp * cfg.dp_replicate} processes or change them"
            )
        shard = rest if cfg.dp_shard == -1 else cfg.dp_shard
        if shard < 1 or cfg.dp_replicate * shard * cfg.tp != world:
            raise ValueError(
                f"parallel.dp_replicate={cfg.dp_replicate} x parallel.dp_shard={cfg.dp_shard} x "
                f"parallel.tp={cfg.tp} must equal the world size {world}; set parallel.dp_shard=-1 "
                "to use the rest of the world"
            )
        return cls(cfg.dp_replicate, shard, cfg.tp)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_model(self, model: ModelConfig) -> None:
        """Tensor parallel splits heads, FFN width and vocabulary evenly."""
        if self.tp == 1:
            return
        for what, n in (
            ("model.n_heads", model.n_heads),
            ("model.ffn_dim", model.ffn),
            ("model.vocab_size", model.vocab_size),
        ):
            if n % self.tp:
                raise ValueError(
                    f"{what}={n} is not divisible by parallel.tp={self.tp}; pick a tp that "
                    f"divides it (divisors up to 8: {[d for d in range(1, 9) if n % d == 0]})"
                )

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """A 3-D mesh ('dp_replicate', 'dp_shard', 'tp') and its data-parallel ranks
        (replicate x shard) flattened into one dimension, for data loading."""
        mesh = init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("dp_replicate", "dp_shard", "tp"),
        )
        return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
