"""
The methods `--method` names, and the contract every method file meets: the one seam through which
the loop (train.py) and the checkpoints (checkpoint.py) meet a method. Neither tests a method's name.

A method file (full.py, lift.py, rocoft.py, lorasb.py, hyper.py) defines:

    Settings                  a dataclass of its paper's defaults; each field's metadata names its
                              "source" (and may give "tiny", the built-in tiny model's value, "help"
                              and "choices" for the method's own flags); cli.py derives the flags.
    prepare(model, s, batches, *, seed, total_steps, grad_accum, n_train, lr_first) -> optimizer
                              freeze the base, attach the method to the target Linears, return the
                              optimizer over exactly its trainable tensors (param_groups with
                              "param_names"). `batches`: an endless iterator of training micro-batches,
                              for methods that look at data first. The keywords are the run's facts
                              (its seed and length in optimizer steps, micro-batches per step, training
                              examples, the first step's lr); a method ignores those it does not use.
    adapter_state(model, optimizer) -> {name: tensor}
                              the learned update, exact (fp32): adapter.safetensors.
    merge_adapter(base, adapter, s) -> {weight name: fp32 tensor}
                              base weights (any dtype) with the update applied, for every matrix it
                              changes: the method's update, stated once.
    merge(model, optimizer, s) -> None
                              fold merge_adapter's update into the live weights (targets.fold) and
                              put plain nn.Linear modules back: the saved file and the model in memory
                              come from the same function.

An optimizer that holds model weights of its own (LIFT's) also defines sharded_weights(params), which
train.py --fsdp calls once fully_shard has replaced them, and collect_gradients(), called after each
step's backward passes, before the gradient is clipped.

Full fine-tuning has no adapter: its trained state is the base weights themselves (TRAINS_BASE = True
in full.py), kept in fp32 as master weights and saved as they are; its merge does nothing.
"""
import full
import hyper
import lift
import lorasb
import rocoft

# --method -> (the file that implements it, its settings: the paper's defaults and their sources)
METHODS = {
    "full": (full, full.Settings),
    "lora": (lorasb, lorasb.LoRA),
    "loraxs": (lorasb, lorasb.LoRAXS),
    "lorasb": (lorasb, lorasb.LoRASB),
    "lift": (lift, lift.Settings),
    "rocoft": (rocoft, rocoft.Settings),
    "hyper": (hyper, hyper.Settings),
}


def trains_base(module) -> bool:
    """Whether a method's trained state is the base weights themselves (full fine-tuning)."""
    return getattr(module, "TRAINS_BASE", False)
