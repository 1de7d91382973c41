"""Exact, recompute-free rollback for DeepSeek-V4 caches.

Stock V4 cache layers cannot be rolled back: `DeepseekV4HCACache` / `DeepseekV4CSACache` trim their
sliding K=V to `sliding_window - 1` on every `update` (ignoring `record_past`), and `crop` knows
nothing of the compressor state (`buffer_kv` / `buffer_gate`, `compressed_kv`, `entry_count` and,
for CSA, `overlap_kv` / `overlap_gate`, each for "compressor" and "indexer").

The recording layers below keep, for the LAST forward only, what a rollback into that forward needs:

* sliding K=V: the `window - 1` keys before the forward plus all of the forward's keys (trimmed to
  `window - 1` at the next forward or at rollback/commit). What `update` returns, and so the
  attention, is exactly what the stock layer returns.
* compressor, per name: the per-token projected `(kv, gate)` of every token from the start of the
  unfinished window before the forward (`entry_count * rate`) to the end of the forward (= the old
  buffer + the forward's tokens), the entry count and overlap state before the forward, and the
  Ca slices (`[..., :head_dim]`, position bias included) of every window the forward closed.

The state is a pure function of the token count N (windows are aligned on absolute position 0):
`entry_count = N // rate`, the buffer holds tokens `[entry_count * rate, N)`, `compressed_kv` holds
one entry per closed window (entry w depends only on tokens of window w, and for CSA window w-1),
and the CSA overlap is the Ca slice of window `entry_count - 1`. Rolling back to N' therefore keeps
the first `N' // rate` entries, rebuilds the buffer from the recorded per-token inputs, and restores
the overlap from the recorded Ca of window `N' // rate - 1` (or the pre-forward overlap when no
window of the forward survives). The next forward then sees the state a cache fed only the kept
tokens would hold, so its outputs are identical.

Only the tokens of the last forward can be rolled back (plus a rollback to 0, which resets); a
rollback/commit (`crop`) drops all recorded history, and each new forward drops the previous one.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache, DeepseekV4HCACache


class _RecordingSlidingMixin:
    """Sliding K/V that keeps the last forward's tokens until the next forward or `crop`.

    Mixed in front of a `DynamicSlidingWindowLayer` subclass. `_begin_forward`, `_rollback_state`
    and `_drop_history` are hooks for the compressor state of the V4 subclasses."""

    # `_layer_type = None` (set on the concrete classes) keeps CacheLayerMixin.__init_subclass__
    # from registering these classes in transformers' global DYNAMIC_LAYER_TYPE_MAPPING.
    _fwd_len: int = 0

    def _keep_last(self, n: int) -> None:
        """Keep the last `n` cached positions (K and V; V4 shares one tensor for both). Copies them,
        so the longer tensor (e.g. a whole prompt's keys) is freed rather than kept alive by a view."""
        # (lazy initialisation leaves a 1-D empty tensor)
        if self.keys is None or self.keys.dim() < 4 or self.keys.shape[-2] <= n:
            return
        shared = self.values is self.keys
        self.keys = self.keys[:, :, self.keys.shape[-2] - n :, :].clone()
        self.values = self.keys if shared else self.values[:, :, self.values.shape[-2] - n :, :].clone()

    def _commit(self) -> None:
        """Make everything cached final: trim to the window and drop the rollback history."""
        self._keep_last(max(self.sliding_window - 1, 0))
        self._fwd_len = 0
        self._drop_history()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        shared = value_states is key_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if shared:
                self.values = self.keys
        self._commit()  # a new forward: the previous one can no longer be rolled back
        self._begin_forward()
        self.cumulative_length += key_states.shape[-2]
        # The cached part is at most `window - 1` positions now, so this is exactly what the stock
        # layer returns (and what `get_mask_sizes` announced).
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = full_k if shared and self.values is self.keys else torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = full_k, full_v
        self._fwd_len = key_states.shape[-2]
        return full_k, full_v

    def rollback_limit(self) -> int:
        """How many trailing positions `crop` can remove (besides removing all of them)."""
        return self._fwd_len

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove and remove == self.cumulative_length:
            self.reset()
            return
        if remove > self._fwd_len:
            raise ValueError(
                f"cannot remove {remove} positions: only the {self._fwd_len} positions of the last forward "
                f"(or all {self.cumulative_length}) can be rolled back exactly"
            )
        if remove:
            self._keep_first(self.keys.shape[-2] - remove)
            self.cumulative_length -= remove
            self._rollback_state(self.cumulative_length)
        self._commit()

    def _keep_first(self, n: int) -> None:
        shared = self.values is self.keys
        self.keys = self.keys[:, :, :n, :]
        self.values = self.keys if shared else self.values[:, :, :n, :]

    def reset(self) -> None:
        super().reset()
        self._fwd_len = 0
        self._drop_history()

    # hooks
    def _begin_forward(self) -> None:
        pass

    def _rollback_state(self, new_length: int) -> None:
        pass

    def _drop_history(self) -> None:
        pass


class RecordingSlidingWindowLayer(_RecordingSlidingMixin, DynamicSlidingWindowLayer):
    """For V4's pure `sliding_attention` layers."""

    _layer_type = None

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.record_past = True


class _RecordingCompressorMixin(_RecordingSlidingMixin):
    """Records the compressor inputs / emitted windows of the last forward (see module doc)."""

    def _init_recording(self) -> None:
        self.record_past = True
        self._fwd_len = 0
        self._drop_history()

    def _drop_history(self) -> None:
        self._entries_before: dict[str, int] = {}
        self._overlap_before: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._raw: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (start pos, kv, gate)
        self._closed_ca: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> Ca kv / gate per window

    def _begin_forward(self) -> None:
        self._entries_before = dict(self.entry_count)
        overlap_kv = getattr(self, "overlap_kv", None)
        if overlap_kv is not None:
            self._overlap_before = {n: (overlap_kv[n], self.overlap_gate[n]) for n in overlap_kv}

    def store_compression_weights(self, name: str, kv: torch.Tensor, gate: torch.Tensor):
        start = self.entry_count[name] * self.compress_rate
        buffered_kv, buffered_gate = self.buffer_kv[name], self.buffer_gate[name]
        if buffered_kv is not None and buffered_kv.shape[1]:
            raw_kv, raw_gate = torch.cat([buffered_kv, kv], dim=1), torch.cat([buffered_gate, gate], dim=1)
        else:
            raw_kv, raw_gate = kv, gate
        self._raw[name] = (start, raw_kv, raw_gate)
        return super().store_compression_weights(name, kv, gate)

    def update_overlap_state(self, name: str, chunk_kv: torch.Tensor, chunk_gate: torch.Tensor, head_dim: int):
        # chunk_*: [B, n_windows, rate, 2 * head_dim] for windows entries_before .. entries_before + n - 1,
        # gate already offset by the position bias, i.e. exactly what the overlap state stores.
        self._closed_ca[name] = (chunk_kv[..., :head_dim].clone(), chunk_gate[..., :head_dim].clone())
        return super().update_overlap_state(name, chunk_kv, chunk_gate, head_dim)

    def _rollback_state(self, new_length: int) -> None:
        rate = self.compress_rate
        entries = new_length // rate
        for name in self.entry_count:
            before = self._entries_before[name]
            start, raw_kv, raw_gate = self._raw[name]
            if entries < before or start != before * rate:
                raise RuntimeError(f"inconsistent compressor history for {name!r}")  # cannot happen
            if self.compressed_kv[name] is not None:
                self.compressed_kv[name] = self.compressed_kv[name][:, :entries]
            self.entry_count[name] = entries
            lo, hi = entries * rate - start, new_length - start
            self.buffer_kv[name] = raw_kv[:, lo:hi].clone()
            self.buffer_gate[name] = raw_gate[:, lo:hi].clone()
            if hasattr(self, "overlap_kv"):
                if entries == before:
                    self.overlap_kv[name], self.overlap_gate[name] = self._overlap_before[name]
                else:
                    ca_kv, ca_gate = self._closed_ca[name]
                    w = entries - 1 - before
                    self.overlap_kv[name] = ca_kv[:, w].clone()
                    self.overlap_gate[name] = ca_gate[:, w].clone()


class RecordingHCACache(_RecordingCompressorMixin, DeepseekV4HCACache):
    _layer_type = None

    def __init__(self, config, **kwargs):
        super().__init__(config)
        self._init_recording()


class RecordingCSACache(_RecordingCompressorMixin, DeepseekV4CSACache):
    _layer_type = None

    def __init__(self, config, **kwargs):
        super().__init__(config)
        self._init_recording()


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache for a DeepSeek-V4 config whose layers are the recording versions."""
    cache = DynamicCache(config=config)
    text_config = config.get_text_config(decoder=True)
    layers = []
    for layer in cache.layers:
        if type(layer) is DeepseekV4CSACache:
            layers.append(RecordingCSACache(text_config))
        elif type(layer) is DeepseekV4HCACache:
            layers.append(RecordingHCACache(text_config))
        elif type(layer) is DynamicSlidingWindowLayer:
            layers.append(RecordingSlidingWindowLayer(sliding_window=layer.sliding_window))
        else:
            raise TypeError(f"no exact rollback for DeepSeek-V4 cache layer {type(layer).__name__}")
    cache.layers = layers
    return cache
