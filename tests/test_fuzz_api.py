"""Engine's promise for bad arguments, fuzzed: generate / create_completion with adversarial sampling
arguments (NaN, infinities, negative and huge numbers, token ids outside the vocabulary) either
raise ValueError at the call, before anything is evaluated (the cache's n_past is unchanged), or run.
Nothing may fail later, at the first sampled token, as an out-of-vocabulary logit_bias once did."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_factory
import vocab
from pyengine import Engine

FLOATS = st.sampled_from((float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-45, 0.5, 1.0, 2.0, 1e30))
INTS = st.sampled_from((-2**63, -1, 0, 1, 5, vocab.N_VOCAB - 1, vocab.N_VOCAB, 2**31, 10**20))
ARGS = st.fixed_dictionaries({}, optional={
    "temperature": FLOATS, "top_p": FLOATS, "min_p": FLOATS, "repeat_penalty": FLOATS,
    "presence_penalty": FLOATS, "frequency_penalty": FLOATS, "top_k": INTS, "seed": INTS,
    "logit_bias": st.dictionaries(INTS, FLOATS, max_size=2), "logprobs": st.sampled_from((None, -1, 0, 1, 5)),
    "max_tokens": st.sampled_from((None, -1, 0, 1, 3))})

EXAMPLES = int(os.environ.get("PYENGINE_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-api") / "m.gguf"
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", expert_type="mxfp4", tie_output=True, n_layer=1,
                                   extra_keys=vocab.gguf_keys("gpt-oss"), n_vocab=vocab.N_VOCAB, seed=3)
    return Engine(path, n_ctx=64, n_threads=1)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=ARGS, completion=st.booleans())
def test_bad_sampling_arguments_raise_at_the_call_or_run(eng, args, completion):
    eng.reset()
    n_past = eng.n_past
    if args.get("max_tokens") in (None, -1, 0):
        args["max_tokens"] = 2  # those mean "to the end of the context": keep each example short
    try:
        if completion:
            out = eng.create_completion([1, 2, 3], stream=True, **args)
        else:
            out = eng.generate([1, 2, 3], **args)
    except ValueError as e:
        assert str(e) and eng.n_past == n_past
        return
    assert len(list(out)) <= 4  # any failure while it runs propagates and fails the example
