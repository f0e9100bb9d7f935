"""Engine's llama-cpp-python-style API on a random-weight gpt-oss carrying the real o200k vocabulary:
tokenize/detokenize against bpe-openai, apply_chat_template against openai-harmony, greedy
generation against transformers' own generate() on the same weights, the OpenAI shapes of
create_completion / create_chat_completion (validated with the openai client's types), the
prompt-prefix cache with a sliding window shorter than the conversation, seeds and cancellation."""

import threading

import numpy as np
import pytest
import gguf_factory
import vocab
from pyengine import Engine
from scripted_model import script_engine

N_CTX = 512
WINDOW = 32  # shorter than every chat prompt below, so the sliding-window layers wrap


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(path, represented float32 weights) of a 3-layer f32 model with the real vocabulary."""
    path = tmp_path_factory.mktemp("api") / "gpt-oss-tiny.gguf"
    weights = gguf_factory.write_gptoss_gguf(
        path, arch="gpt-oss", wtype="f32", expert_type="f32", tie_output=True, n_layer=3,
        drop_keys=("attention.sliding_window",), extra_keys=vocab.gguf_keys("gpt-oss", attention_sliding_window=WINDOW),
        n_vocab=vocab.N_VOCAB, seed=11)
    return path, weights


@pytest.fixture(scope="module")
def eng(model):
    # an f32 KV cache: its greedy output is compared with transformers' float32 one
    return Engine(model[0], n_ctx=N_CTX, n_threads=2, n_batch=64, cache_type_k="f32", cache_type_v="f32")


CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue? Explain Rayleigh scattering briefly."}]


def test_tokenize_and_detokenize_match_o200k(eng):
    bpe_openai = pytest.importorskip("bpe_openai")
    ref = bpe_openai.get_encoding("o200k_base")
    rng = np.random.default_rng(0)
    alphabet = list("abc XYZ 019 \n\t.,;!?'\"-_") + ["é", "ß", "日本", "😀", "  ", "\u200b", "ü"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 40))))
        ids = eng.tokenize(text)
        assert ids == ref.encode(text)
        assert eng.detokenize(ids) == text
    assert eng.tokenize("<|start|>user", special=True) == [200006, 1428]
    assert eng.tokenize("<|start|>", special=False) == ref.encode("<|start|>")
    assert eng.tokenize("hi", add_bos=True)[0] == 199998
    assert eng.tokenize(b"caf\xc3\xa9") == ref.encode("café")


def test_apply_chat_template_matches_openai_harmony(eng, tmp_path):
    harmony = pytest.importorskip("openai_harmony")
    enc = vocab.load_harmony_encoding(tmp_path)
    convo = harmony.Conversation.from_messages([
        harmony.Message.from_role_and_content(
            harmony.Role.SYSTEM, harmony.SystemContent.new().with_reasoning_effort(harmony.ReasoningEffort.LOW)),
        harmony.Message.from_role_and_content(
            harmony.Role.DEVELOPER, harmony.DeveloperContent.new().with_instructions(CHAT[0]["content"])),
        harmony.Message.from_role_and_content(harmony.Role.USER, CHAT[1]["content"]),
    ])
    expected = enc.render_conversation_for_completion(convo, harmony.Role.ASSISTANT)
    assert eng.apply_chat_template(CHAT, reasoning_effort="low") == list(expected)


def test_greedy_generation_matches_transformers(model, eng):
    pytest.importorskip("transformers")
    import torch
    from gptoss_reference import hf_model_from_gguf_weights, to_float64

    prompt = eng.apply_chat_template(CHAT)
    n_new = 24
    got = [ev.id for ev in eng.generate(prompt, max_tokens=n_new, temperature=0, stop_token_ids=())]
    hf = to_float64(hf_model_from_gguf_weights(model[1], eng.hparams), eng.hparams)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=n_new)
    assert got == out[0, len(prompt):].tolist()
    assert len(prompt) > WINDOW


def test_prefix_cache_reuses_the_conversation_and_agrees_with_a_fresh_context(model, eng):
    first = eng.create_chat_completion(CHAT, max_tokens=12, temperature=0, logprobs=True)
    turn2 = CHAT + [{"role": "assistant", "content": first["choices"][0]["message"]["content"] or "ok"},
                    {"role": "user", "content": "And at sunset, why is it red?"}]
    prompt2 = eng.apply_chat_template(turn2)
    reused = list(eng.generate(prompt2, max_tokens=10, temperature=0, logprobs=0, stop_token_ids=()))
    assert eng.n_prompt_reused > WINDOW  # the first turn came from the cache, past the sliding window
    fresh_eng = Engine(model[0], n_ctx=N_CTX, n_threads=1, cache_type_k=eng.cache_type_k, cache_type_v=eng.cache_type_v)
    fresh = list(fresh_eng.generate(prompt2, max_tokens=10, temperature=0, logprobs=0, stop_token_ids=()))
    assert [e.id for e in reused] == [e.id for e in fresh]
    np.testing.assert_allclose([e.logprob for e in reused], [e.logprob for e in fresh], rtol=1e-4, atol=1e-4)


def test_a_next_turn_reuses_its_prompt_after_a_generation_longer_than_the_rings(model, eng, monkeypatch, tmp_path):
    """gpt-oss drops a turn's reasoning from the next turn's prompt, so the next prompt leaves the
    cache right after the previous prompt, with the whole generation to rewind: more than the
    sliding rings keep. The checkpoint the core takes at the end of each prompt brings their keys
    back: the earlier prompt is not evaluated again, and the answer is a fresh context's."""
    prompt = eng.apply_chat_template(CHAT)
    eng.reset()
    generated = [e.id for e in eng.generate(prompt, max_tokens=100, temperature=0, stop_token_ids=())]
    assert len(generated) == 100 > eng.n_batch + 1 and len(prompt) > WINDOW
    eng.save_state().save(tmp_path / "turn1.pyestate")  # the checkpoint goes into the file too
    follow = prompt + eng.tokenize("<|channel|>final<|message|>Blue light scatters more.<|end|>"
                                   "<|start|>user<|message|>And at sunset?<|end|><|start|>assistant", special=True)
    evaluated = []
    real_eval = eng.runner.eval

    def counting(caches, tokens, *args, **kwargs):
        evaluated.append(sum(len(t) for t in tokens))
        return real_eval(caches, tokens, *args, **kwargs)

    monkeypatch.setattr(eng.runner, "eval", counting)
    reused = list(eng.generate(follow, max_tokens=8, temperature=0, logprobs=0, stop_token_ids=()))
    assert eng.n_prompt_reused == len(prompt)
    assert sum(evaluated) == len(follow) - len(prompt) + len(reused) - 1  # the earlier prompt: not again
    fresh_eng = Engine(model[0], n_ctx=N_CTX, n_threads=1, cache_type_k="f32", cache_type_v="f32")
    fresh = list(fresh_eng.generate(follow, max_tokens=8, temperature=0, logprobs=0, stop_token_ids=()))
    assert [e.id for e in reused] == [e.id for e in fresh]
    np.testing.assert_allclose([e.logprob for e in reused], [e.logprob for e in fresh], rtol=1e-4, atol=1e-4)
    from pyengine import EngineState  # the same turn in another engine, from the file turn 1 left

    state = EngineState.load(tmp_path / "turn1.pyestate")
    assert [c.n for c in state.checkpoints] == [len(prompt)] and len(state.tokens) == len(prompt) + 99
    later = Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64, cache_type_k="f32", cache_type_v="f32")
    later.load_state(state)
    again = list(later.generate(follow, max_tokens=8, temperature=0, logprobs=0, stop_token_ids=()))
    assert later.n_prompt_reused == len(prompt)
    assert [(e.id, e.logprob) for e in again] == [(e.id, e.logprob) for e in reused]


def test_a_repeated_turn_and_a_branch_from_an_earlier_turn_reuse_checkpoints(model, eng):
    """The same prompt again (a regenerated answer) rewinds through the checkpoint at its end to
    one token short of it. A prompt that leaves the cache inside a later turn, further before that
    turn's checkpoint than the rings reach, rewinds to the earlier turn's checkpoint: several are
    kept (Engine(ctx_checkpoints=...)); with one kept it is evaluated from the start. The answers
    are a fresh engine's."""
    def turn(prompt: list[int], engine: Engine = eng) -> list[tuple[int, float]]:
        return [(e.id, e.logprob) for e in engine.generate(prompt, max_tokens=70, temperature=0, logprobs=0,
                                                            stop_token_ids=())]

    def after(text: str) -> list[int]:
        return prompt1 + eng.tokenize(f"<|channel|>final<|message|>{text}<|end|><|start|>user<|message|>"
                                      "And at sunset?<|end|><|start|>assistant", special=True)

    prompt1 = eng.apply_chat_template(CHAT)
    long_answer = after(" ".join(["Blue light scatters more than red light does."] * 8))
    branch = after("Rayleigh.")
    fresh = Engine(model[0], n_ctx=N_CTX, n_threads=1, cache_type_k="f32", cache_type_v="f32")
    for kept in (8, 1):
        eng.runner.n_checkpoints = kept
        eng.reset()
        first = turn(prompt1)
        assert turn(prompt1) == first and eng.n_prompt_reused == len(prompt1) - 1
        turn(long_answer)
        assert eng.n_prompt_reused == len(prompt1)
        assert [c.n for c in eng._cache.checkpoints] == [len(prompt1), len(long_answer)][-kept:]
        shared = eng._cache.common_prefix(branch)
        assert len(long_answer) - shared > eng.runner.n_batch + 1  # past the later checkpoint's reach
        got = turn(branch)
        assert eng.n_prompt_reused == (len(prompt1) if kept > 1 else 0)
        np.testing.assert_allclose(np.array(got), np.array(turn(branch, fresh)), rtol=1e-4, atol=1e-4)
    eng.runner.n_checkpoints = 8
    with pytest.raises(ValueError, match="ctx_checkpoints"):
        Engine(model[0], n_ctx=N_CTX, ctx_checkpoints=-1)


def test_checkpoints_inside_a_long_prompt_serve_a_change_in_its_middle(model, eng):
    """A long prompt is checkpointed every checkpoint_min_step tokens as well as at its end. A next
    prompt that changes it in the middle, further back than the later checkpoints reach, rewinds to
    the latest checkpoint before the change; with the step off (0) it is evaluated from the start.
    The answers are a fresh engine's."""
    text = " ".join(f"Fact {i}: light of wavelength {400 + 7 * i} nm scatters as its inverse fourth power."
                    for i in range(20))
    prompt = eng.apply_chat_template([CHAT[0], {"role": "user", "content": text}])
    assert 384 < len(prompt) < N_CTX - 20
    change = 256 + 20  # the first token changed: after the checkpoint at 256, out of reach of those at 384 and the end
    assert 384 - change > eng.runner.n_batch + 1
    edited = prompt[:change] + eng.tokenize(" Facts differ.") + prompt[change + 4:]
    fresh = Engine(model[0], n_ctx=N_CTX, n_threads=1, cache_type_k="f32", cache_type_v="f32")
    want = [(e.id, e.logprob) for e in fresh.generate(edited, max_tokens=6, temperature=0, logprobs=0,
                                                       stop_token_ids=())]
    for step in (128, 0):
        eng.runner.checkpoint_min_step = step
        eng.reset()
        list(eng.generate(prompt, max_tokens=2, temperature=0, stop_token_ids=()))
        # n_batch = 64 tokens a chunk from the start: one whenever 128 followed the latest, and one at the end
        assert [c.n for c in eng._cache.checkpoints] == ([128, 256, 384] if step else []) + [len(prompt)]
        got = [(e.id, e.logprob) for e in eng.generate(edited, max_tokens=6, temperature=0, logprobs=0,
                                                        stop_token_ids=())]
        assert eng.n_prompt_reused == (256 if step else 0)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    eng.runner.checkpoint_min_step = 4096
    with pytest.raises(ValueError, match="checkpoint_min_step"):
        Engine(model[0], n_ctx=N_CTX, checkpoint_min_step=-2)


def test_state_files_keep_every_checkpoint_and_read_the_one_checkpoint_layout(eng, tmp_path):
    """A state file holds all of a cache's checkpoints (counts, then each one's rings in order);
    a file from before several were kept (one count as a scalar) still loads."""
    from pyengine.engine_state import EngineState

    prompt = eng.apply_chat_template(CHAT)
    eng.reset()
    for end in (40, len(prompt)):
        eng.eval(prompt[eng.n_past:end])
        eng.runner.take_checkpoint(eng._cache)
    state = eng.save_state()
    state.save(tmp_path / "two")
    back = EngineState.load(tmp_path / "two")
    assert [c.n for c in back.checkpoints] == [40, len(prompt)]
    for saved, read in zip(state.checkpoints, back.checkpoints):
        assert len(saved.rings) == len(read.rings) and all(map(np.array_equal, saved.rings, read.rings))
    with np.load(tmp_path / "two") as archive:
        members = {k: archive[k] for k in archive.files if not k.startswith(("ring", "checkpoint_n"))}
    last = state.checkpoints[-1].rings
    np.savez(tmp_path / "one.npz", **members, checkpoint_n=np.array(len(prompt), np.int64),
             **{f"ring{i:03d}": r for i, r in enumerate(last)})
    old = EngineState.load(tmp_path / "one.npz")
    assert [c.n for c in old.checkpoints] == [len(prompt)] and all(map(np.array_equal, old.checkpoints[0].rings, last))
    eng.load_state(old)
    assert eng.runner.reusable(eng._cache, 45) == 45 and [c.n for c in eng._cache.checkpoints] == [len(prompt)]


def test_save_and_load_state_continue_a_prompt_bit_for_bit(model, eng):
    import pickle

    prompt = eng.apply_chat_template(CHAT + [
        {"role": "assistant", "content": "Air molecules scatter short blue wavelengths more than red ones. " * 2},
        {"role": "user", "content": "And why is the sunset red? Explain it with the light's path through the air."}])
    assert len(prompt) > WINDOW + 64  # the sliding rings (window + n_batch slots) have wrapped
    eng.reset()
    eng.eval(prompt)
    state = pickle.loads(pickle.dumps(eng.save_state()))  # a state pickles (a disk cache of prompts)
    assert state.tokens == prompt and state.nbytes > 0
    more = eng.tokenize(" Because short waves scatter more.")
    want = eng.eval(more, logits_all=True)
    eng.reset()
    eng.eval(eng.tokenize("Something else entirely, to overwrite the cache. " * 12))
    eng.load_state(state)
    assert eng.n_past == len(prompt)
    np.testing.assert_array_equal(eng.eval(more, logits_all=True), want)
    eng.load_state(state)  # a generation after load_state takes the saved prompt from the cache
    list(eng.generate(prompt + more, max_tokens=2, temperature=0))
    assert eng.n_prompt_reused == len(prompt)

    kv = {"cache_type_k": "f32", "cache_type_v": "f32", "n_batch": 64}
    bigger = Engine(model[0], n_ctx=2 * N_CTX, n_threads=1, **kv)  # more context, another thread count
    bigger.load_state(state)
    np.testing.assert_array_equal(bigger.eval(more, logits_all=True), want)
    with pytest.raises(ValueError, match="does not fit"):
        Engine(model[0], n_ctx=64, n_threads=1, **kv).load_state(state)
    with pytest.raises(ValueError, match="does not fit"):  # another n_batch: rings of another size
        Engine(model[0], n_ctx=N_CTX, n_threads=1, cache_type_k="f32", cache_type_v="f32", n_batch=32).load_state(state)
    other = Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64)  # f16 cache: rows of another type
    other.eval(more)
    with pytest.raises(ValueError, match="KV cache type"):
        other.load_state(state)
    assert other.n_past == len(more)  # untouched
    with pytest.raises(TypeError):
        eng.load_state({"tokens": prompt})


def test_state_files_outlive_the_engine_and_refuse_what_they_are_not(model, eng, tmp_path):
    from pyengine import EngineState
    from pyengine.engine_state import StateFileError

    prompt = eng.tokenize("A state file keeps a long prompt's KV cache from one process to the next. " * 8)
    assert len(prompt) > WINDOW + 64  # the sliding rings have wrapped
    eng.reset()
    eng.eval(prompt)
    path = tmp_path / "conversation.pyestate"
    written = eng.save_state().save(path)
    assert written == path.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == [path.name]
    more = eng.tokenize(" Then it goes on from there.")
    want = eng.eval(more, logits_all=True)
    other = Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64, cache_type_k="f32", cache_type_v="f32")
    state = EngineState.load(path)
    assert state.tokens == prompt and state.key == eng.save_state().key
    other.load_state(state)
    np.testing.assert_array_equal(other.eval(more, logits_all=True), want)
    with pytest.raises(ValueError, match="KV cache type"):  # read fine, refused by an f16 cache
        Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64).load_state(state)
    older = EngineState(state.tokens, state.rows, state.key[:-1], state.checkpoints)  # a key without the row format
    other.load_state(older)  # files from before it are read as this CPU's, as they were
    np.testing.assert_array_equal(other.eval(more, logits_all=True), want)
    from pyengine.runner import Checkpoint

    rings = eng._cache.native.rings
    for checkpoints in ((Checkpoint(5, tuple(r[:, :-1] for r in rings)),),  # rings of another size
                        (Checkpoint(len(prompt) + 1, tuple(rings)),), (Checkpoint(5, tuple(rings[:-1])),),
                        (Checkpoint(5, tuple(rings)), Checkpoint(3, tuple(rings))),  # not in order
                        (Checkpoint(5, tuple(rings)), Checkpoint(5, tuple(rings)))):
        forged = EngineState(state.tokens, state.rows, state.key, checkpoints)
        before = other.save_state()
        with pytest.raises(ValueError, match="does not fit"):
            other.load_state(forged)
        assert other.save_state().tokens == before.tokens and other._cache.checkpoints == before.checkpoints

    data = path.read_bytes()
    rng = np.random.default_rng(5)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40  # inside the K/V rows: the archive's CRC-32 catches it
    bad = {"empty": b"", "header only": data[:64], "a third": data[:len(data) // 3],
           "all but the end": data[:-22], "one byte short": data[:-1], "flipped": bytes(flipped),
           "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "text": b"PK\x03\x04 not a zip"}
    for name, content in bad.items():
        f = tmp_path / f"bad {name}"
        f.write_bytes(content)
        with pytest.raises(StateFileError, match=f"bad {name}"):
            EngineState.load(f)
    pickled = tmp_path / "pickled.npz"  # an object member needs pickle: never unpickled
    np.savez(pickled, format=np.array("pyengine-state/1"), key=np.array("[]"), tokens=np.zeros(3, np.int32),
             rows000=np.array([{"x": 1}], dtype=object))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 2, 2), np.float32))
    missing = tmp_path / "missing.npz"
    np.savez(missing, format=np.array("pyengine-state/1"), key=np.array("[]"), rows000=np.zeros((1, 1, 1)))
    flat = tmp_path / "flat.npz"
    np.savez(flat, format=np.array("pyengine-state/1"), key=np.array("[]"), tokens=np.zeros(3, np.int32),
             rows000=np.zeros(4, np.float32))
    stray = tmp_path / "stray ring.npz"  # checkpoint rings without their token count
    np.savez(stray, format=np.array("pyengine-state/1"), key=np.array("[]"), tokens=np.zeros(3, np.int32),
             ring000=np.zeros((1, 1, 1), np.float32))
    beyond = tmp_path / "beyond.npz"  # a checkpoint past the tokens
    np.savez(beyond, format=np.array("pyengine-state/1"), key=np.array("[]"), tokens=np.zeros(3, np.int32),
             checkpoint_n=np.array(4, np.int64), ring000=np.zeros((1, 1, 1), np.float32))
    base = dict(format=np.array("pyengine-state/1"), key=np.array("[]"), tokens=np.zeros(3, np.int32))
    ring = np.zeros((1, 1, 1), np.float32)
    unordered = tmp_path / "unordered.npz"  # checkpoints' counts must increase
    np.savez(unordered, **base, checkpoint_n=np.array([2, 1], np.int64), ring000=ring, ring001=ring)
    uneven = tmp_path / "uneven.npz"  # three rings for two checkpoints
    np.savez(uneven, **base, checkpoint_n=np.array([1, 2], np.int64), ring000=ring, ring001=ring, ring002=ring)
    for f in (pickled, single, missing, flat, stray, beyond, unordered, uneven):
        with pytest.raises(StateFileError, match=f.name):
            EngineState.load(f)
    with pytest.raises(FileNotFoundError):
        EngineState.load(tmp_path / "never written")


def check_state_of_another_cpu_level(model_path: str, state_path: str, own_path: str) -> None:
    """(Run at a capped SIMD level by the test below.) The state file of the AVX-512 process is
    refused, and this level's own state is written for that process to refuse."""
    from pyengine import EngineState

    eng = Engine(model_path, n_ctx=N_CTX, n_threads=1, n_batch=64)
    try:
        eng.load_state(EngineState.load(state_path))
        raise AssertionError("a state with keys in AVX-512 tiles was loaded into a cache of plain rows")
    except ValueError as e:
        assert "another way" in str(e), e
    eng.eval(eng.tokenize("Plain rows here."))
    eng.save_state().save(own_path)


def test_states_of_another_cpu_level_are_refused(model, tmp_path):
    """The f16 keys lie in tiles of 16 slots on AVX-512 CPUs and in plain rows below (the layout the
    attention loop of the process's SIMD level reads): a state carries its format in its key, so a
    state file moved to a machine (or a process capped by PYENGINE_SIMD) of the other kind is
    refused, not read into attention as garbage."""
    from simd_levels import at_level

    from pyengine import EngineState, simd_level

    if simd_level() != "avx512":
        pytest.skip("the keys lie in tiles only on AVX-512 CPUs")
    eng = Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64)
    eng.eval(eng.tokenize("Keys in tiles of sixteen slots. " * 4))
    assert eng.save_state().key[-1] == ("cpu", "key tiles of 16")
    eng.save_state().save(tmp_path / "tiles.pyestate")
    at_level("avx2", "test_engine_api", f"check_state_of_another_cpu_level({str(model[0])!r}, "
             f"{str(tmp_path / 'tiles.pyestate')!r}, {str(tmp_path / 'rows.pyestate')!r})", cwd=tmp_path)
    rows = EngineState.load(tmp_path / "rows.pyestate")
    assert rows.key[-1] == ("cpu", "rows")
    with pytest.raises(ValueError, match="another way"):
        eng.load_state(rows)


def test_create_completion_shape_stream_and_tokens(eng):
    openai = pytest.importorskip("openai")
    kw = dict(max_tokens=8, temperature=0.9, seed=123, logprobs=2)
    whole = eng.create_completion("The capital of France is", **kw)
    openai.types.Completion.model_validate(whole)
    choice = whole["choices"][0]
    assert whole["object"] == "text_completion" and choice["finish_reason"] in ("stop", "length")
    assert len(whole["tokens"]) == whole["usage"]["completion_tokens"] <= 8
    assert whole["usage"]["prompt_tokens"] == len(eng.tokenize("The capital of France is"))
    assert choice["text"] == eng.detokenize(whole["tokens"][:-1] if choice["finish_reason"] == "stop"
                                            else whole["tokens"])
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(whole["tokens"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(v <= 0 for v in lp["token_logprobs"])

    chunks = list(eng.create_completion("The capital of France is", stream=True, **kw))
    openai.types.Completion.model_validate(chunks[-1])  # earlier chunks: finish_reason None, as OpenAI streams
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    other = eng.create_completion("The capital of France is", **{**kw, "seed": 124})
    again = eng.create_completion("The capital of France is", **kw)
    assert again["tokens"] == whole["tokens"]
    assert other["tokens"] != whole["tokens"]
    echoed = eng.create_completion("Hello", max_tokens=2, temperature=0, echo=True)
    assert echoed["choices"][0]["text"].startswith("Hello")


def test_create_chat_completion_shape_and_stream(eng):
    openai = pytest.importorskip("openai")
    kw = dict(max_tokens=16, temperature=0.7, seed=7, logprobs=True, top_logprobs=3)
    whole = eng.create_chat_completion(CHAT, **kw)
    openai.types.chat.ChatCompletion.model_validate(whole)
    msg = whole["choices"][0]["message"]
    assert msg["role"] == "assistant" and whole["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    lp = whole["choices"][0]["logprobs"]["content"]
    assert all(len(e["top_logprobs"]) == 3 for e in lp)
    assert b"".join(bytes(e["bytes"]) for e in lp) == (msg["content"] or "").encode()
    for text in (msg["content"] or "", msg["reasoning_content"] or ""):
        assert "<|" not in text

    chunks = list(eng.create_chat_completion(CHAT, stream=True, **kw))
    for c in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    assert content == (msg["content"] or "") and reasoning == (msg["reasoning_content"] or "")
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


ANSWER = ("<|channel|>analysis<|message|>User asks about the sky. Rayleigh.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Short waves scatter more. END here.<|return|>")
CALL = ("<|channel|>analysis<|message|>Need weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        "<|message|>{\"city\": \"Paris\"}<|call|>")


@pytest.fixture
def scripted_eng(model):
    eng = Engine(model[0], n_ctx=N_CTX, n_threads=1, n_batch=64)
    eng.script = script_engine(eng, lambda prompt: ANSWER)
    return eng


@pytest.mark.parametrize("stream", [False, True])
def test_chat_output_is_split_into_reasoning_content_and_tool_calls(scripted_eng, stream):
    def run(text, stop):
        scripted_eng.script.script = lambda prompt: text
        out = scripted_eng.create_chat_completion(CHAT, stop=stop, stream=stream)
        if not stream:
            c = out["choices"][0]
            return c["message"], c["finish_reason"]
        msg = {"content": "", "reasoning_content": "", "tool_calls": []}
        finish = None
        for ch in out:
            d = ch["choices"][0]["delta"]
            msg["content"] += d.get("content") or ""
            msg["reasoning_content"] += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls") or []:
                if tc.get("id"):
                    msg["tool_calls"].append({"id": tc["id"], "type": "function",
                                              "function": {"name": tc["function"]["name"], "arguments": ""}})
                msg["tool_calls"][tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
            finish = ch["choices"][0]["finish_reason"] or finish
        return msg, finish

    msg, finish = run(ANSWER, [])
    assert (msg["reasoning_content"], msg["content"], finish) == (
        "User asks about the sky. Rayleigh.", "Short waves scatter more. END here.", "stop")
    msg, finish = run(ANSWER, ["END", "sky"])  # stop strings cut the answer, never the reasoning
    assert (msg["reasoning_content"], msg["content"], finish) == (
        "User asks about the sky. Rayleigh.", "Short waves scatter more. ", "stop")
    msg, finish = run(CALL, [])
    assert finish == "tool_calls" and msg["reasoning_content"] == "Need weather."
    (call,) = msg["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
    assert call["id"].startswith("call_")


def test_cancel_from_another_thread_stops_generation(eng):
    stream = eng.create_completion("Count: one two three", max_tokens=200, temperature=1.0, seed=1, stream=True)
    chunks = [next(stream)]
    t = threading.Thread(target=eng.cancel)
    t.start()
    t.join()
    chunks += list(stream)
    assert len(chunks) <= 3 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The next call is not affected by the earlier cancel.
    assert eng.create_completion("Count:", max_tokens=3, temperature=0, stop=[])["usage"]["completion_tokens"] >= 1


def test_bad_arguments_raise_before_generating(eng):
    with pytest.raises(ValueError):
        eng.create_completion("x", top_p=2.0)
    with pytest.raises(ValueError):
        eng.generate([vocab.N_VOCAB + 5], max_tokens=2)
    with pytest.raises(ValueError):
        eng.generate(list(range(1000, 1000 + N_CTX)), max_tokens=2)
    with pytest.raises(ValueError):
        eng.apply_chat_template([{"role": "wizard", "content": "x"}])
    # logit_bias is checked with the rest of the request, not when the first token is sampled
    n_past = eng.n_past
    with pytest.raises(ValueError, match="logit_bias token 100000000000000000000 is outside the vocabulary"):
        eng.generate([1, 2], max_tokens=2, logit_bias={10**20: 1.0})
    with pytest.raises(ValueError, match="logit_bias of token 5 is NaN"):
        eng.create_completion("x", max_tokens=2, logit_bias={5: float("nan")})
    with pytest.raises(ValueError, match=r"logit_bias of token 6 is \+inf"):
        eng.create_completion("x", max_tokens=2, logit_bias={6: float("inf")})
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        eng.create_completion("x", max_tokens=2, temperature=float("inf"))
    assert eng.n_past == n_past
