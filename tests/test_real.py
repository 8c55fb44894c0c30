"""Real tokenizers, real data and the official ReTool protocol (../shared/real): the official prompt
template and interpreter block, </code> completed by merged BPE tokens, a padded head, the CLI end to end."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import data
import eval as ev
import retool

REAL = Path(__file__).resolve().parents[2] / "shared/real"
TEMPLATE_JSON = REAL / "retool-official/prompt_template.json"
BONUS = 12.0  # added to the scripted token's logit: greedy picks it, its log-prob stays a real one
TINY = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
PROBLEM = "What is 4821 * 937?"
TRACE = ("I multiply with Python.\n<code>\n```python\nprint(4821*937)\n```\n</code>\n<interpreter>\n4517277\n"
         "</interpreter>\n\nSo the product is 4517277.\n<answer>\n\\boxed{4517277}\n</answer>")
MESSAGES = [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": TRACE}]


def need_real():
    if not TEMPLATE_JSON.is_file():
        message = f"{REAL} is missing (the real artifacts beside this clone)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def qwen():
    need_real()
    return transformers.AutoTokenizer.from_pretrained(REAL / "qwen2.5-tokenizer")


@pytest.fixture(scope="module")
def template():
    need_real()
    return data.load_template(f"{TEMPLATE_JSON}:retool")


class Scripted(retool.Transformer):
    """A real tiny Qwen2 whose logits at position p get +BONUS on script[p + 1], with or without the
    engine's cache: greedy decoding writes the script, log-probs are those of this very model."""

    def forward(self, input_ids, position_ids=None, document_ids=None, cache=None, head=None):
        logits = super().forward(input_ids, position_ids, document_ids, cache, head)  # (B, T, V)
        B, T = input_ids.shape
        pos = cache.ctx.positions[:, -1:] if cache is not None else torch.arange(T).expand(B, T)
        nxt = self.script[(pos + 1).clamp(max=len(self.script) - 1)]
        return logits + BONUS * F.one_hot(nxt, logits.shape[-1])


def scripted(vocab, script):
    torch.manual_seed(0)
    model = Scripted(retool.ModelConfig.from_hf({**TINY, "vocab_size": vocab}))
    retool.init_weights(model)
    model.script = torch.tensor(script)
    return model.eval()


def segments(tok, template):
    """The official trace as tokenize_trace cuts it: prompt, code segment, interpreter block, rest."""
    ids, mask = data.tokenize_trace(tok, MESSAGES, template=template)
    prompt = data.render_prompt(tok, PROBLEM, template=template)
    block = data.encode_interpreter(tok, "4517277", official=True)
    code = tok.encode(TRACE[:TRACE.index("</code>") + len("</code>")], add_special_tokens=False)
    rest = ids[len(prompt) + len(code) + len(block):]
    assert prompt + code + block + rest == ids and mask == [0] * len(prompt) + [1] * len(code) + [0] * len(block) + [1] * len(rest)
    return prompt, code, block, rest


@pytest.mark.parametrize("completion", [">", ">\n", "></"])
def test_engine_stream_is_the_sft_stream_whatever_token_closes_code(qwen, template, completion):
    prompt, code, block, rest = segments(qwen, template)
    assert code[-3:] == [522, 1851, 29]  # '</', 'code', '>' in SFT
    closer = qwen.convert_tokens_to_ids(completion.replace("\n", "Ċ"))  # byte-level: '\n' is 'Ċ'
    if completion == ">\n":  # the '\n' it carries starts the block: it stays sampled, the rest is injected
        injected = qwen.encode(data.interpreter_block("4517277", official=True)[1:], add_special_tokens=False)
        want = code[:-1] + [closer] + injected + rest
        want_mask = [1] * len(code) + [0] * len(injected) + [1] * len(rest)
    else:  # '>' as in SFT; '></' is dropped and '>' injected before the block
        want = code + block + rest
        want_mask = [1] * (len(code) - (completion == "></")) + [0] * (len(block) + (completion == "></")) + [1] * len(rest)
    script = prompt + code[:-1] + [closer] + want[len(code):]
    model = scripted(len(qwen), script)
    traj, = retool.generate(model, qwen, [prompt], max_new_tokens=len(want) + 4, temperature=0,
                            tool=lambda codes: ["4517277\n" for _ in codes], official=True)
    assert traj.finish_reason == "eos" and traj.tool_calls[0].code.strip() == "print(4821*937)"
    assert traj.response_ids == want and traj.loss_mask == want_mask
    assert traj.text == TRACE  # the canonical text, as SFT trained it
    assert "</code>\n<interpreter>\n4517277\n</interpreter>\n\n" in traj.text
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + want]))[0], -1)  # (T, V)
    sampled = [j for j, m in enumerate(want_mask) if m]
    expect = torch.stack([full[len(prompt) + j - 1, want[j]] for j in sampled])
    got = torch.tensor([traj.logprobs[j] for j in sampled])
    assert torch.allclose(got, expect, atol=1e-4) and all(traj.logprobs[j] == 0.0 for j, m in enumerate(want_mask) if not m)


def test_official_template_is_the_official_user_turn(qwen, template, tmp_path):
    row = json.loads((REAL / "retool-official/AIME24.jsonl").read_text().splitlines()[0])
    ids = data.render_prompt(qwen, row["input"], template=template)
    official = json.loads(TEMPLATE_JSON.read_text())["retool"].format(query=row["input"])
    assert ids == qwen.apply_chat_template([{"role": "user", "content": official}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert len(ids) == 353  # as measured in retool-official/SOURCE.txt
    text = qwen.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # Qwen2.5's default
    assert text.endswith("\\boxed{'The final answer goes here.'}\n</answer><|im_end|>\n<|im_start|>assistant\n")
    assert "</code>" + data.interpreter_block("4517277\n", official=True) == \
        "</code>\n" + "<interpreter>\n" + "4517277\n" + "</interpreter>\n\n"  # the official harness's bytes
    assert qwen.encode("</code>" + data.interpreter_block("4517277", official=True)) == \
        [522, 1851, 397, 27, 90554, 397, 19, 20, 16, 22, 17, 22, 22, 198, 522, 90554, 1339]
    # readers keep the bare problem of a ReTool-SFT user turn (its braces doubled, as in the data),
    # so the template gives back the official instruction, not ours
    raw = json.loads(TEMPLATE_JSON.read_text())["retool"].replace("{query}", row["input"])
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": raw},
                                             {"role": "assistant", "content": TRACE}]}) + "\n")
    assert data.load_sft(rows)[0][0]["content"] == row["input"].strip()
    assert data.extract_answer(TRACE) == "4517277" and data.reward(TRACE, "4517277") == 1.0  # <answer> tags


def test_dapo_parquet_rows_get_the_template_not_the_dapo_instruction(qwen, template):
    problems = data.load_rl(REAL / "data/official-DAPO-repo-eval-aime-2024.parquet")
    assert len(problems) == 30  # 960 rows: 30 problems x 32
    text = qwen.decode(data.render_prompt(qwen, problems[0].problem, template=template))
    assert "*user question:*" in text and "Answer: $Answer" not in text and problems[0].problem in text


def test_think_template_and_end_of_turn_tokens(template):
    need_real()
    qwen3 = transformers.AutoTokenizer.from_pretrained(REAL / "qwen3-tokenizer")
    # the full conversation renders an empty <think></think> that the generation prompt lacks: SFT
    # streams are built from the generation prompt, as the engine sees them
    full = qwen3.apply_chat_template(MESSAGES, tokenize=False)
    assert "<think>" in full
    ids, mask = data.tokenize_trace(qwen3, MESSAGES, template=template)
    prompt = data.render_prompt(qwen3, PROBLEM, template=template)
    assert ids[:len(prompt)] == prompt and "<think>" not in qwen3.decode(ids)
    assert ids[-1] == qwen3.convert_tokens_to_ids("<|im_end|>") and mask[-1] == 1
    stops = retool.stop_ids(qwen3)
    assert {qwen3.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} <= stops


def test_padded_head_never_samples_an_id_past_the_tokenizer(qwen):
    padded = 152_064  # Qwen2.5's config vocab_size; the tokenizer has 151,665 ids
    prompt = qwen.encode("Hello", add_special_tokens=False)
    model = scripted(padded, [151_700] * 64)  # the head's favourite is an id no tokenizer entry has
    with torch.no_grad():
        assert int(model(torch.tensor([prompt]))[0, -1].argmax()) >= len(qwen)
    trajs = retool.generate(model, qwen, [prompt] * 4, max_new_tokens=12, temperature=1.0, seed=0)
    ids = [i for t in trajs for i in t.response_ids]
    assert len(ids) == 48 and max(ids) < len(qwen)


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory, qwen):
    """A tiny random Qwen2 saved with the real tokenizer, its pad token removed (as Llama's has none)."""
    path = tmp_path_factory.mktemp("real") / "model"
    tok = transformers.AutoTokenizer.from_pretrained(REAL / "qwen2.5-tokenizer")
    tok.pad_token = None
    retool.save_model(retool.build_model({**TINY, "vocab_size": 152_064}, 0), tok, path)
    return path


def test_sft_rl_eval_end_to_end_with_the_official_template(real_ckpt, tmp_path):
    spec = f"{TEMPLATE_JSON}:retool"
    rows = tmp_path / "retool_sft.jsonl"
    rows.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"*user question:*\nWhat is {a} * 937?\n\n\nRemember to place the final answer"},
        {"role": "assistant", "content": TRACE.replace("4821", str(a))}]}) + "\n" for a in range(4821, 4825)))
    assert retool.sft_main(["--model", str(real_ckpt), "--data", str(rows), "--out", str(tmp_path / "sft"),
                            "--steps", "2", "--batch", "1", "--pack-len", "512", "--heldout", "0",
                            "--prompt-template", spec]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    assert (tmp_path / "sft/config.json").is_file()
    assert retool.rl_main(["--model", str(tmp_path / "sft"), "--data", str(REAL / "data/cogrpo_verl-debug_dapo_mini64.parquet"),
                           "--out", str(tmp_path / "rl"), "--steps", "1", "--algo", "grpo", "--prompts", "1",
                           "--rollouts", "2", "--mini-batches", "1", "--micro-batch", "2", "--max-new-tokens", "8",
                           "--prompt-template", spec]) == 0
    assert json.loads((tmp_path / "rl/metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    out = tmp_path / "eval"
    assert ev.main(["--model", str(tmp_path / "rl"), "--data", str(REAL / "retool-official/AIME24.jsonl"),
                    "--limit", "2", "--k", "1", "--max-new-tokens", "8", "--out", str(out),
                    "--prompt-template", spec]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["prompt_template"] == spec and len(results["per_problem"]) == 2
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("name, content, error", [
    ("plain.txt", "Solve this problem.", "no {query} in the template"),
    ("two.json", json.dumps({"a": "A {query}", "b": "B {query}"}), "2 string values, name one as"),
    ("missing.txt", None, "no such file"),
    ("fields.txt", "{query} in {lang}", "not a str.format template"),
])
def test_bad_templates_are_one_line_errors(tmp_path, capsys, name, content, error):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert ev.main(["--prompt-template", str(path), "--limit", "1"]) == 2
    assert retool.sft_main(["--prompt-template", str(path), "--out", str(tmp_path / "sft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(error in line and str(path) in line for line in err)
    if name == "two.json":  # FILE:KEY picks one
        assert data.load_template(f"{path}:b").format(query="x") == "B x"


def test_a_tokenizer_that_prepends_bos_gets_it_once(template):
    need_real()  # Llama-style: encode() prepends BOS and the chat template writes it too
    tok = transformers.AutoTokenizer.from_pretrained(REAL / "qwen2.5-tokenizer", bos_token="<|endoftext|>",
                                                     add_bos_token=True)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok.encode("x")[0] == tok.bos_token_id
    ids, mask = data.tokenize_trace(tok, MESSAGES, template=template)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    keep, injected = retool.close_code(tok, tok.encode("</code>", add_special_tokens=False),
                                       data.interpreter_block("1", official=True))
    assert keep and tok.bos_token_id not in injected
