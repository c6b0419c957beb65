"""Engine-exact tokenization (``igw-sim --tokenizer DIR``) against ids recorded from transformers.

The fixture ``data/hf-tokenizer`` holds the tiny test model's tokenizer files and ``parity.json``, written
by ``tools/sim/hf_tokenizer_parity.py`` with the vLLM venv's transformers (5.19).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from igw_sim.cli import main
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.hf_tokenizer import HFTokenizer, TokenizerLoadError
from igw_sim.kvevents import BlockStored, KVEvent
from igw_sim.tokenizer import TOY, ChatFormatError

DATA = Path(__file__).parent / "data" / "hf-tokenizer"
PARITY: dict[str, Any] = json.loads((DATA / "parity.json").read_text(encoding="utf-8"))
TOK = HFTokenizer.load(DATA)
BLOCK = 16
CONFIG = EngineConfig(
    max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1, block_size=BLOCK, tokenizer=TOK
)
LONG_PREFIX = " ".join(f"Section {i}: the quick brown fox jumps over the lazy dog." for i in range(40))


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(ports=[0], engine=CONFIG) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(session: aiohttp.ClientSession, fleet: SimFleet, path: str, body: dict[str, Any]) -> Any:
    async with session.post(f"http://{fleet.addresses[0]}{path}", json=body) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
        return payload


# -- the tokenizer alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", PARITY["completions"], ids=lambda c: repr(c["text"])[:30])
def test_completion_ids_match_transformers(case: dict[str, Any]) -> None:
    assert TOK.encode(case["text"], add_special_tokens=case["add_special_tokens"]) == case["ids"]


@pytest.mark.parametrize(
    "case", PARITY["chats"], ids=lambda c: str(len(c["messages"])) + str(c["add_generation_prompt"])
)
def test_chat_rendering_and_ids_match_transformers(case: dict[str, Any]) -> None:
    text = TOK.render_chat(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
    assert TOK.encode(text, add_special_tokens=False) == case["ids"]


@pytest.mark.parametrize("variant", PARITY["bos_eos_variants"], ids=lambda v: json.dumps(v["config"]))
def test_add_bos_and_eos_flags_in_the_config_rebuild_the_post_processor(
    variant: dict[str, Any], tmp_path: Path
) -> None:
    for file in DATA.iterdir():
        shutil.copyfile(file, tmp_path / file.name)
    config = json.loads((DATA / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **variant["config"]}), encoding="utf-8")
    tok = HFTokenizer.load(tmp_path)
    assert [tok.encode(t, add_special_tokens=True) for t in variant["texts"]] == variant["ids"]


def test_each_generated_piece_is_one_token_that_round_trips() -> None:
    assert len(TOK.generation_ids) >= 16
    assert len(set(TOK.generation_ids)) == len(TOK.generation_ids)
    for token, piece in zip(TOK.generation_ids, TOK.generation_pieces, strict=True):
        assert TOK.decode([token]) == piece
        assert TOK.encode(piece, add_special_tokens=False) == [token]
        assert piece[0] == " "
        assert piece[1:].isalpha()


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
def test_concatenated_generated_pieces_retokenize_one_to_one(seed: int) -> None:
    ids = [TOK.generated_id(seed, i) for i in range(300)]
    text = "".join(TOK.generated_piece(seed, i) for i in range(300))
    assert TOK.encode(text, add_special_tokens=False) == ids
    assert [TOK.generated_id(seed, i) for i in range(300)] == ids  # deterministic
    rng = random.Random(seed)
    shuffled = rng.choices(range(len(TOK.generation_ids)), k=200)
    text = "".join(TOK.generation_pieces[k] for k in shuffled)
    assert TOK.encode(text, add_special_tokens=False) == [TOK.generation_ids[k] for k in shuffled]


def test_an_answer_quoted_in_the_next_turn_keeps_its_generated_ids() -> None:
    answer_ids = [TOK.generated_id(7, i) for i in range(20)]
    answer = "".join(TOK.generated_piece(7, i) for i in range(20))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    ids = TOK.encode(TOK.render_chat(messages, add_generation_prompt=False), add_special_tokens=False)
    assert any(ids[i : i + len(answer_ids)] == answer_ids for i in range(len(ids)))


def test_template_errors_and_bad_messages_are_chat_format_errors(tmp_path: Path) -> None:
    shutil.copyfile(DATA / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}",
        encoding="utf-8",
    )
    tok = HFTokenizer.load(tmp_path)
    assert (
        tok.render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "é"}]}])
        == '"a\\né"'
    )
    with pytest.raises(ChatFormatError, match="first must be user"):
        tok.render_chat([{"role": "system", "content": "x"}])
    with pytest.raises(ChatFormatError, match="role"):
        tok.render_chat([{"content": "x"}])
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ChatFormatError, match="no chat template"):
        HFTokenizer.load(tmp_path).render_chat([{"role": "user", "content": "x"}])


def _corrupt_tokenizer_json(directory: Path) -> Path:
    (directory / "tokenizer.json").write_text("{not json", encoding="utf-8")
    return directory


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing", "not a directory"),
        (lambda d: d, "tokenizer.json: no such file"),
        (_corrupt_tokenizer_json, "tokenizer.json: "),
    ],
    ids=["missing-dir", "no-tokenizer-json", "corrupt-tokenizer-json"],
)
def test_a_bad_directory_is_a_one_line_load_error(setup: Callable[[Path], Path], message: str, tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=message) as info:
        HFTokenizer.load(setup(tmp_path))
    assert "\n" not in str(info.value)


def test_the_toy_tokenizer_stays_the_default() -> None:
    assert EngineConfig().tokenizer is TOY


# -- through the server ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", PARITY["completions"], ids=lambda c: repr(c["text"])[:30])
async def test_tokenize_and_render_completion_parity(
    case: dict[str, Any], fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {"prompt": case["text"], "add_special_tokens": case["add_special_tokens"]}
    tokenized = await _post(session, fleet, "/tokenize", body)
    assert tokenized["tokens"] == case["ids"]
    assert tokenized["count"] == len(case["ids"])
    rendered = await _post(session, fleet, "/v1/completions/render", body)
    assert rendered[0]["token_ids"] == case["ids"]


@pytest.mark.parametrize(
    "case", PARITY["chats"], ids=lambda c: str(len(c["messages"])) + str(c["add_generation_prompt"])
)
async def test_tokenize_and_render_chat_parity(
    case: dict[str, Any], fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {"messages": case["messages"], "add_generation_prompt": case["add_generation_prompt"]}
    tokenized = await _post(session, fleet, "/tokenize", body)
    assert tokenized["tokens"] == case["ids"]
    rendered = await _post(session, fleet, "/v1/chat/completions/render", body)
    assert rendered["token_ids"] == case["ids"]


async def test_usage_prompt_tokens_are_the_tokenizers_counts(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    completion, chat = PARITY["completions"][1], PARITY["chats"][1]
    out = await _post(session, fleet, "/v1/completions", {"prompt": completion["text"], "max_tokens": 3})
    assert out["usage"]["prompt_tokens"] == len(completion["ids"])
    out = await _post(session, fleet, "/v1/chat/completions", {"messages": chat["messages"], "max_tokens": 3})
    assert out["usage"]["prompt_tokens"] == len(chat["ids"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_generated_text_retokenizes_to_completion_tokens(
    stream: bool, fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {"prompt": "Tell me a story", "max_tokens": 40, "stream": stream, "stream_options": {"include_usage": True}}
    if not stream:
        del body["stream_options"]
        out = await _post(session, fleet, "/v1/completions", body)
        text, usage = out["choices"][0]["text"], out["usage"]
    else:
        pieces: list[str] = []
        async with session.post(f"http://{fleet.addresses[0]}/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        pieces.append(chunk["choices"][0]["text"])
                    else:
                        usage = chunk["usage"]
        assert all(len(TOK.encode(p, add_special_tokens=False)) == 1 for p in pieces)
        text = "".join(pieces)
    assert usage["completion_tokens"] == 40
    assert len(TOK.encode(text, add_special_tokens=False)) == 40


async def test_kv_events_carry_the_tokenizers_ids(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    events: list[KVEvent] = []
    fleet.engines[0].kv_event_listeners.append(events.extend)
    prompt = LONG_PREFIX[:900]
    out = await _post(session, fleet, "/v1/completions", {"prompt": prompt, "max_tokens": 40})
    prompt_ids = TOK.encode(prompt, add_special_tokens=True)
    generated = TOK.encode(out["choices"][0]["text"], add_special_tokens=False)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert all(len(e.token_ids) == BLOCK * len(e.block_hashes) for e in stored)
    published = [token for e in stored for token in e.token_ids]
    sequence = prompt_ids + generated
    assert len(published) // BLOCK >= len(prompt_ids) // BLOCK > 10  # every full prompt block, at least
    assert published == sequence[: len(published)]
    assert max(sequence) <= TOK.max_token_id


async def test_two_requests_sharing_a_long_prefix_hit_the_prefix_cache(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    first = await _post(
        session, fleet, "/v1/completions", {"prompt": LONG_PREFIX + " First question?", "max_tokens": 2}
    )
    second = await _post(session, fleet, "/v1/completions", {"prompt": LONG_PREFIX + " Second one!", "max_tokens": 2})
    shared = len(TOK.encode(LONG_PREFIX, add_special_tokens=True)) - 1  # the last prefix token may merge
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached % BLOCK == 0
    assert shared - BLOCK < cached <= shared


async def test_chat_turns_hit_the_cache_through_the_quoted_answer(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    messages = [{"role": "user", "content": LONG_PREFIX}]
    first = await _post(session, fleet, "/v1/chat/completions", {"messages": messages, "max_tokens": 64})
    answer = first["choices"][0]["message"]["content"]
    turn = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    second = await _post(session, fleet, "/v1/chat/completions", {"messages": turn, "max_tokens": 2})
    first_prompt = first["usage"]["prompt_tokens"]
    # the cached prefix reaches into the answer: its generated ids re-tokenize in the next prompt
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first_prompt


async def test_server_info_and_engine_state_name_the_tokenizer_directory(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"http://{fleet.addresses[0]}/server_info") as resp:
        assert (await resp.json())["tokenizer_path"] == str(DATA)
    async with session.get(f"http://{fleet.addresses[0]}/sim/engine") as resp:
        assert (await resp.json())["tokenizer"] == str(DATA)


async def test_bad_requests_are_400(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    url = f"http://{fleet.addresses[0]}"
    cases = [
        ("/v1/completions", {"prompt": [5, TOK.max_token_id + 1]}, "out of vocabulary"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "content"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 1},
            "chat_template_kwargs",
        ),
    ]
    for path, body, message in cases:
        async with session.post(url + path, json=body) as resp:
            assert resp.status == 400, body
            assert message in (await resp.json())["error"]["message"]


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_cli_bad_tokenizer_dir_exits_2_with_one_line(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing" if bad == "missing" else tmp_path
    assert main(["--tokenizer", str(path), "--ports", "0", "--duration", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("igw-sim: error: --tokenizer: ")


async def test_cli_serves_with_the_tokenizer_and_reports_its_path(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "igw_sim", "--ports", "0", "--tokenizer", str(DATA), "--duration", "20",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        address = line.rsplit("http://", 1)[1].strip()
        async with session.get(f"http://{address}/server_info") as resp:
            assert (await resp.json())["tokenizer_path"] == str(DATA)
        async with session.post(f"http://{address}/tokenize", json={"prompt": "Hello world"}) as resp:
            assert (await resp.json())["tokens"] == PARITY["completions"][0]["ids"]
    finally:
        proc.terminate()
        await proc.wait()
