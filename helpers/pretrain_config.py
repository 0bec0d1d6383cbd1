"""The model a pretraining run trains: a new one's config from the options, or the saved one's on ``--resume``.

A new model takes its architecture from ``--arch`` or its ``--preset``, its sizes from the preset
and then the size options (a modern model's own sizes derived from GPT-2's where not given: see
``helpers.pretrain``'s doc). A resumed run keeps the saved config and refuses options that would
change it; of the training options, those given again replace the saved ones (``resume_changes``
names them). The classes come from ``helpers.architectures``, never imported by hand.
"""

from __future__ import annotations

from torch import nn

from helpers.architectures import ARCHITECTURES, architecture_of, get_architecture
from helpers.pretrain_options import PretrainError, given_sizes, option_text, requested_arch

__all__ = ["default_hidden_dim", "flops_per_token", "keep_saved_options", "model_config", "new_model", "resume_changes"]

_GPT2, _MODERN = ARCHITECTURES["gpt2"], ARCHITECTURES["modern"]


_DEFAULT_SIZES = _GPT2.config(emb_dim=256, n_heads=4, n_layers=4, context_length=256, drop_rate=0.0)
_MODERN_ROPE_THETA = 10_000.0
_GPT2_PRESET_KEYS = ("vocab_size", "n_layers", "n_heads", "emb_dim", "context_length")


def _preset_values(preset: str) -> dict:
    """The config fields a ``--preset`` sets: a GPT-2's sizes, or all of a modern model's but its vocabulary."""
    if preset in _MODERN.preset_configs:
        values = _MODERN.preset_configs[preset].to_dict()
        del values["vocab_size"], values["drop_rate"], values["tie_weights"]  # the data's tokenizer; flags decide
        return values
    return {key: getattr(_GPT2.preset_configs[preset], key) for key in _GPT2_PRESET_KEYS}


def _resume_clashes(args, saved, saved_arch: str) -> list[str]:
    """The options that ``--resume`` would ignore because the saved model decides them."""
    requested = requested_arch(args)
    if requested is not None and requested != saved_arch:
        asked = f"--arch {args.arch}" if args.arch else f"--preset {args.preset} (a {requested} model)"
        return [f"{asked} (saved: {saved_arch})"]
    saved_values, given = saved.to_dict(), given_sizes(args)
    clashes = [f"{option_text(k, v)} (saved: " + (f"{saved_values[k]})" if k in saved_values else
                                                   f"a {saved_arch} model, which has no {k})")
               for k, v in given.items() if saved_values.get(k, object()) != v]
    if args.preset:
        clashes += [f"--preset {args.preset} sets {k} {v} (saved: {saved_values.get(k)})"
                    for k, v in _preset_values(args.preset).items() if k not in given and saved_values.get(k) != v]
    if args.tie_weights and not saved.tie_weights:
        clashes.append("--tie-weights (saved: untied)")
    if args.init is not None:
        clashes.append(f"--init {args.init} (a resumed model keeps its trained weights)")
    return clashes


# options a resumed run applies in place of the saved ones (the log says which changed), and those it refuses
_HONOURED_ON_RESUME = ("data", "lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip",
                       "batch_size", "grad_accum", "seed", "precision")
_REFUSED_ON_RESUME = {"val_fraction": "the validation split would no longer be the tokens held out so far"}


def keep_saved_options(args, saved_args: dict) -> None:
    """Give the honoured options this command line left out their saved values, so a bare ``--resume`` continues
    the run as it was (``args.explicit``, set by ``main``, names the options given; without it all count as given)."""
    explicit = getattr(args, "explicit", None)
    if explicit is None:
        return
    for name in _HONOURED_ON_RESUME:
        if name not in explicit and name in saved_args:
            setattr(args, name, saved_args[name])


def resume_changes(saved_args: dict, args) -> str:
    """The honoured options that differ from the saved run's (``"weight_decay 0.1 -> 0.5"``); refuse the others."""
    def differs(name: str) -> bool:
        return name in saved_args and saved_args[name] != getattr(args, name)

    refused = [f"--{name.replace('_', '-')} {getattr(args, name)} (saved: {saved_args[name]}; {why})"
               for name, why in _REFUSED_ON_RESUME.items() if differs(name)]
    if refused:
        raise PretrainError(f"--resume cannot honour {', '.join(refused)}; leave it out to continue, "
                            "or start a new run in another --out")
    return ", ".join(f"{name} {saved_args[name]} -> {getattr(args, name)}" for name in _HONOURED_ON_RESUME
                     if differs(name))


def model_config(args, saved: dict | None, saved_arch: str | None = None) -> tuple[str, object]:
    """The architecture and config of a new model (preset, then the sizes given), or the saved ones when resuming."""
    if saved is not None:
        config = get_architecture(saved_arch or "gpt2").config.from_dict(saved)
        clashes = _resume_clashes(args, config, saved_arch or "gpt2")
        if clashes:
            raise PretrainError(f"--resume continues the saved model, but these options differ: {', '.join(clashes)}; "
                                "leave them out to continue, or start a new run in another --out")
        return saved_arch or "gpt2", config
    if (requested_arch(args) or "gpt2") == "modern":
        return "modern", _modern_config(args)
    base = _GPT2.preset_configs[args.preset] if args.preset else _DEFAULT_SIZES
    values = {**base.to_dict(), **given_sizes(args)}
    if args.tie_weights:
        values["tie_weights"] = True
    return "gpt2", _GPT2.config(**values)


def _modern_config(args):
    """A new modern model's config: a modern preset's sizes, or GPT-2's (preset or default) with derived extras."""
    if args.preset in _MODERN.preset_configs:
        values = {**_MODERN.preset_configs[args.preset].to_dict(), "vocab_size": _DEFAULT_SIZES.vocab_size,
                  "drop_rate": _DEFAULT_SIZES.drop_rate, **given_sizes(args)}
    else:
        base = _GPT2.preset_configs[args.preset] if args.preset else _DEFAULT_SIZES
        values = {key: getattr(base, key) for key in (*_GPT2_PRESET_KEYS, "drop_rate")} | given_sizes(args)
        values.setdefault("head_dim", values["emb_dim"] // values["n_heads"])
        values.setdefault("n_kv_heads", values["n_heads"] // 2 if values["n_heads"] % 2 == 0 else values["n_heads"])
        values.setdefault("hidden_dim", default_hidden_dim(values["emb_dim"]))
        values.setdefault("rope_theta", _MODERN_ROPE_THETA)
        values.setdefault("qk_norm", True)
        values["tie_weights"] = False
    if args.tie_weights:
        values["tie_weights"] = True
    return _MODERN.config(**values)


def default_hidden_dim(emb_dim: int) -> int:
    """SwiGLU's inner width for a width of ``emb_dim``: 8/3 x emb_dim to the nearest multiple of 64 (at least 64).

    Its three matrices then hold about as many weights as GPT-2's feed-forward (two of 4 x emb_dim).
    """
    return max(64, 64 * round(8 * emb_dim / 3 / 64))


def new_model(arch: str, cfg, init: str | None) -> nn.Module:
    """A model of ``arch`` initialised as ``init`` says (``"gpt2"``, ``"pytorch"``; None: a resumed model's weights
    are about to be loaded, so any initialisation will do)."""
    model = get_architecture(arch).model(cfg)
    if arch == "gpt2":  # GPTModel starts with PyTorch's initialisation of each layer
        if init == "gpt2":
            get_architecture(arch).init_weights(model)
        return model
    if init == "pytorch":  # ModernModel starts with init_modern_weights: GPT-2's scheme
        for module in model.modules():  # each layer's own default; a tied head keeps the embedding's draw
            if isinstance(module, (nn.Linear, nn.Embedding)) and not (
                    module is model.out_head and model.out_head.weight is model.tok_emb.weight):
                module.reset_parameters()
    return model


def flops_per_token(cfg) -> float:
    """Training FLOPs per token (forward and backward) of a ``GPTConfig`` or ``ModernConfig`` (see helpers.pretrain)."""
    if architecture_of(cfg) == "modern":
        attention_width = cfg.n_heads * cfg.head_dim
        per_block = (2 * cfg.emb_dim * attention_width  # queries and output projection
                     + 2 * cfg.emb_dim * cfg.n_kv_heads * cfg.head_dim  # keys and values (grouped)
                     + 3 * cfg.emb_dim * cfg.hidden_dim)  # SwiGLU: gate, up and down
    else:
        attention_width = cfg.emb_dim
        per_block = 4 * cfg.emb_dim * cfg.emb_dim + 8 * cfg.emb_dim * cfg.emb_dim  # attention projections + MLP
    matmul_weights = cfg.n_layers * per_block + cfg.vocab_size * cfg.emb_dim
    return 6 * matmul_weights + 12 * cfg.n_layers * attention_width * cfg.context_length
