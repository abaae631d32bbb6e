"""A forget adapter's life after training: stack, combine, merge, revoke, inspect, verify
(one module per verb in this package).

Every operation is bookkeeping over stock PEFT adapters and `forget_manifest.json`:

    stack    several adapters active at once on one base (PEFT multi-adapter, outputs summed)
    combine  several adapters -> one LoRA whose delta is exactly their sum (rank concatenation)
    merge    pristine base + adapters -> a standalone safetensors model (merged in fp32, once)
    revoke   merged model (or combined adapter) minus some requests -> the same bytes as merging
             (combining) the rest from scratch; needs the pristine base the manifest points to
    inspect  a readable summary of any of the above
    verify   re-score a forget set under a model + stack: the audit

Combined adapters and merged models embed a copy of each adapter they are made of (with its own
manifest), so they can be audited and revoked from the directory alone.
"""

from .combine import combine_adapters
from .describe import describe, format_description
from .merge import merge_adapters, merged_in_memory, pristine_base
from .revoke import revoke
from .stack import active_adapters, remove_from_stack, stack_adapters
from .verify import collect_leaves, format_verify_line, match_samples, verify_forget_set

__all__ = ["stack_adapters", "active_adapters", "remove_from_stack", "combine_adapters", "merge_adapters", "revoke",
           "describe", "format_description", "collect_leaves", "verify_forget_set", "format_verify_line",
           "match_samples", "merged_in_memory", "pristine_base"]
