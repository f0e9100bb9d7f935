"""No hyperparameter value reaches the C core unchecked: a file whose values are adversarial (zero,
odd, huge, negative, NaN, the wrong kind) is either refused with ModelLoadError or runs.

tests/test_fuzz_reader.py fuzzes the reader (bytes, cuts, flips); this one writes well-formed files
whose values are wrong and goes on to load an Engine and decode, where a value that slipped past
validation would index out of a buffer in C. Run in-process on purpose: a crash fails the run."""

import os

import numpy as np
from gguf import GGUFValueType as VT
from gguf_factory import write_gptoss_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyengine import Engine
from pyengine.errors import ModelLoadError

KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "expert_feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.layer_norm_rms_epsilon", "attention.sliding_window", "expert_count", "expert_used_count",
        "attention.sliding_window_pattern", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
        "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.yarn_beta_fast",
        "rope.scaling.yarn_beta_slow")
# Around the tiny file's real sizes (64 wide, 4 heads of 16, 4 experts, 2 used) and the type limits.
INTS = (0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 96, 128, 4095, 65536, 2**31 - 1, 2**31, 2**32 - 1)
FLOATS = (0.0, -0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf"), 0.5, 2.0)

VALUE = st.one_of(st.tuples(st.sampled_from(INTS), st.just(VT.UINT32)),
                  st.tuples(st.sampled_from(FLOATS), st.just(VT.FLOAT32)),
                  st.tuples(st.sampled_from((-1, -2**31, 2**40)), st.just(VT.INT64)),
                  st.tuples(st.sampled_from(("abc", "yarn", "none", "linear")), st.just(VT.STRING)),
                  st.tuples(st.sampled_from((True, False)), st.just(VT.BOOL)),
                  st.tuples(st.lists(st.booleans(), min_size=1, max_size=3), st.just(VT.ARRAY)),
                  st.tuples(st.lists(st.sampled_from(INTS[:8]), min_size=1, max_size=3), st.just(VT.ARRAY)))

EXAMPLES = int(os.environ.get("PYENGINE_FUZZ_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=st.dictionaries(st.sampled_from(KEYS), VALUE, min_size=1, max_size=3),
       expert_type=st.sampled_from(("f32", "q8_0", "mxfp4")), n_ctx=st.sampled_from((16, 64, 300)),
       exact=st.booleans())
def test_adversarial_hyperparameters_are_refused_or_run(tmp_path_factory, values, expert_type, n_ctx, exact):
    path = tmp_path_factory.mktemp("h") / "m.gguf"
    write_gptoss_gguf(path, with_tokenizer=True, n_vocab=300, expert_type=expert_type, write_ff_key=True,
                      drop_keys=tuple(values), extra_keys={f"gptoss.{k}": v for k, v in values.items()})
    try:
        engine = Engine(str(path), n_ctx=n_ctx, exact=exact, verbose=False)
    except ModelLoadError as e:
        assert str(e)
        return
    logits = engine.eval([1, 2, 3, 4, 5], logits_all=True)
    assert logits.shape == (5, 300)
    for _ in range(4):
        logits = engine.eval([int(np.argmax(logits[-1]))])
    engine.truncate(2)
    assert engine.eval([7, 8]).shape[-1] == 300
