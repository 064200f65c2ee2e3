"""Regenerate the SmolLM2 real-model demo data (deterministic): python data/smollm2/make_data.py

The task: travel-request extraction into a strict house format. The user pastes one sentence
about a trip; the assistant answers with exactly one line of JSON, fixed key order, the date as
MM-DD (zero-padded month and day, no year):

    Anna Berg flew from Oslo to Lisbon on 12 March.
    {"name": "Anna Berg", "from": "Oslo", "to": "Lisbon", "date": "03-12"}

The system prompt asks for this in words, as a user would ("as JSON: traveller name, origin,
destination, date"); the exact keys, key order, date format and the bare line (no code fence, no
prose) are what fine-tuning teaches, so the base SmolLM2-135M-Instruct fails the held-out checks
while the tuned adapter passes them. The held-out checks (eval_prompts.json) use first names,
surnames, cities and sentence templates that never occur in training, so a pass shows the model
generalised the format, not that it memorised rows. Dates use the two spellings of training
("12 March", "March 12") in both sets.

Files written next to this script:
  travel.jsonl           SFT rows (chat "messages": system, user, assistant), and the rows of
                         replay.jsonl (make_replay.py: the base model's own answers to general
                         questions, against forgetting) mixed in
  eval_prompts.json      held-out task checks (exact answer, must stop)
  preference.jsonl       DPO pairs on training names/cities/templates: chosen = the house answer,
                         rejected = a plausible wrong one (origin and destination swapped, day and
                         month swapped, no leading zeros in the date, the date as written in the
                         text, a code fence, prose)
  preference_val.jsonl   DPO pairs on the held-out names/cities/templates
general_checks.json (20 general questions the base answers right) is written by hand, not here.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "Extract the trip from the message as JSON: traveller name, origin, destination, date."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

TRAIN_FIRST = ["Anna", "Lars", "Maria", "Tom", "Sofia", "David", "Emma", "Peter", "Laura", "Jonas", "Clara",
               "Mark", "Julia", "Felix", "Nina", "Oscar", "Eva", "Hugo", "Lena", "Paul", "Sara", "Ivan",
               "Mia", "Leo", "Alice", "Ben", "Olga", "Omar", "Rosa", "Karl", "Ines", "Ali", "Aino", "Bram",
               "Chiara", "Dmitri", "Elif", "Farid", "Gustav", "Hiroshi", "Ingrid", "Jakub", "Kerstin", "Luca",
               "Mateo", "Noor", "Odile", "Pavel", "Quentin", "Rania", "Stefan", "Tomasz", "Ulla", "Vera",
               "Wim", "Yusuf", "Zofia", "Agnes", "Bjorn", "Carmen", "Dario", "Esther", "Fatima", "Goran",
               "Helga", "Igor", "Janne", "Kofi", "Liesel", "Milos", "Nadia", "Orla", "Priya", "Rui", "Selma",
               "Teodor", "Ugo", "Vilma", "Xavier", "Yara", "Zeno"]
TRAIN_LAST = ["Berg", "Novak", "Silva", "Meyer", "Rossi", "Smith", "Jensen", "Kowalski", "Dubois", "Garcia",
              "Fischer", "Olsen", "Brown", "Costa", "Weber", "Popescu", "Horvat", "Larsen", "Moreau", "Khan",
              "Lopez", "Nowak", "Schmidt", "Taylor", "Ferrari", "Svensson", "Murphy", "Ivanova", "Aalto",
              "Brandt", "Castellano", "Dimitrov", "Eriksen", "Fontaine", "Gallo", "Haugen", "Iqbal", "Jovanovic",
              "Keller", "Lindgren", "Mancini", "Nakamura", "Oliveira", "Pereira", "Quist", "Ricci", "Szabo",
              "Toth", "Urban", "Varga", "Wagner", "Yilmaz", "Zeller", "Achterberg", "Baptiste", "Ciobanu",
              "Duarte", "Engel", "Forsberg", "Grimaldi", "Hoffmann", "Kaminski", "Lehmann", "Marin", "Nagy",
              "Okafor", "Pellegrini", "Rasmussen", "Sorensen", "Tanaka", "Vasquez", "Wojcik"]
TRAIN_CITIES = ["Oslo", "Lisbon", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Warsaw",
                "Athens", "Paris", "London", "Helsinki", "Zurich", "Munich", "Milan", "Porto", "Lyon",
                "Krakow", "Budapest", "Hamburg", "Seville", "Naples", "Geneva", "Brussels", "Copenhagen",
                "Stockholm", "Amsterdam", "Barcelona", "Valencia", "Bergen", "Riga", "Aarhus", "Antwerp",
                "Basel", "Bilbao", "Bordeaux", "Bratislava", "Bremen", "Bristol", "Cologne", "Coimbra",
                "Dresden", "Dubrovnik", "Edinburgh", "Florence", "Frankfurt", "Gothenburg", "Graz", "Hanover",
                "Innsbruck", "Kaunas", "Leeds", "Leipzig", "Ljubljana", "Lodz", "Malaga", "Malmo", "Marseille",
                "Nantes", "Nice", "Nuremberg", "Odense", "Palermo", "Pisa", "Plovdiv", "Poznan", "Reykjavik",
                "Rotterdam", "Sarajevo", "Sofia", "Split", "Stuttgart", "Tampere", "Thessaloniki", "Trieste",
                "Turin", "Turku", "Utrecht", "Verona", "Wroclaw", "Zagreb", "Aberdeen", "Alicante", "Bari",
                "Belgrade", "Bucharest", "Cardiff", "Cluj", "Galway", "Ghent", "Linz", "Lille", "Lugano",
                "Mostar", "Nicosia", "Oulu", "Rennes", "Skopje", "Tirana", "Uppsala", "Valletta", "Zaragoza"]
HELD_OUT_FIRST = ["Greta", "Victor", "Hanna", "Rafael", "Elsa", "Marco", "Tara", "Simon"]
HELD_OUT_LAST = ["Lindqvist", "Moretti", "Nielsen", "Petrov", "Walsh", "Herrera", "Bakker", "Sato"]
HELD_OUT_CITIES = ["Tallinn", "Vilnius", "Bologna", "Granada", "Salzburg", "Gdansk", "Bruges", "Toulouse",
                   "Cork", "Lucerne"]

# {n} name, {a} origin, {b} destination, {d} date as written
TRAIN_TEMPLATES = [
    "{n} flew from {a} to {b} on {d}.",
    "Please book a flight for {n} from {a} to {b} on {d}.",
    "{n} is taking the train from {a} to {b} on {d}.",
    "On {d}, {n} travels from {a} to {b}.",
    "Hi, this is {n}. I need to get from {a} to {b} on {d}, thanks.",
    "{n} will fly to {b} from {a} on {d}.",
    "Trip request: {n}, {a} to {b}, {d}.",
    "Can you arrange travel for {n}? Leaving {a} on {d}, going to {b}.",
    "{n} departs {a} on {d} for a meeting in {b}.",
    "We need a ticket to {b} for {n}, departing from {a} on {d}.",
    "Booking for {n}: from {a}, to {b}, date {d}.",
    "{n} is driving from {a} down to {b} on {d}.",
]
HELD_OUT_TEMPLATES = [
    "Reserve a seat for {n} on {d}, {a} to {b}.",
    "My colleague {n} has to be in {b} on {d}, starting out in {a}.",
    "Next trip: {n} goes from {a} to {b} on {d}.",
    "Could you sort out a journey from {a} to {b} for {n} on {d}?",
]


def trip(rng, firsts, lasts, cities, templates):
    """(user text, house answer, fields) for one random trip."""
    name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    a, b = rng.sample(cities, 2)
    # day: half of them single-digit, the zero padding ("06-01") a model most often drops
    month, day = rng.randrange(12), (rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(10, 28))
    written = f"{day} {MONTHS[month]}" if rng.random() < 0.5 else f"{MONTHS[month]} {day}"
    text = rng.choice(templates).format(n=name, a=a, b=b, d=written)
    fields = {"name": name, "from": a, "to": b, "date": f"{month + 1:02d}-{day:02d}"}
    return text, answer(fields), fields, written


def answer(fields: dict) -> str:
    return json.dumps(fields)  # {"name": "...", "from": "...", "to": "...", "date": "MM-DD"}


TRAIN = (TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES, TRAIN_TEMPLATES)
HELD_OUT = (HELD_OUT_FIRST, HELD_OUT_LAST, HELD_OUT_CITIES, HELD_OUT_TEMPLATES)
SFT_ROWS = 600
CHECKS = 20
PREFERENCE_PAIRS = 300
PREFERENCE_VAL_PAIRS = 60


def unique_trips(rng, pool, count: int):
    """`count` trips from `pool` with distinct user texts, drawn lazily (the caller's own draws from
    `rng` between two trips stay in the same order)."""
    seen: set[str] = set()
    while len(seen) < count:
        drawn = trip(rng, *pool)
        if drawn[0] not in seen:
            seen.add(drawn[0])
            yield drawn


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def sft(rng) -> None:
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                          {"role": "assistant", "content": out}]}
            for text, out, _, _ in unique_trips(rng, TRAIN, SFT_ROWS)]
    # replay.jsonl (make_replay.py): the base model's own answers to general questions, spread through
    # the task rows at seeded places (their own generator: the checks below stay as they are)
    place = random.Random(2930)
    for row in (json.loads(line) for line in (HERE / "replay.jsonl").read_text(encoding="utf-8").splitlines()):
        rows.insert(place.randrange(len(rows) + 1), row)
    write_jsonl("travel.jsonl", rows)
    checks = []
    for i in range(CHECKS):
        text, out, _, _ = trip(rng, *HELD_OUT)
        checks.append({"name": f"held-out-{i:02d}", "system": SYSTEM, "prompt": text,
                       "expect": {"exact": out, "must_stop": True}})
    with open(HERE / "eval_prompts.json", "w", encoding="utf-8") as fh:
        json.dump({"checks": checks}, fh, indent=1)
        fh.write("\n")


def rejected(rng, fields: dict, written: str) -> str:
    """A plausible wrong answer to the same trip."""
    kind = rng.choice(["swap", "daymonth", "unpadded", "unpadded", "written", "fence", "prose"])
    wrong = dict(fields)
    mm, dd = fields["date"].split("-")
    if kind == "swap":
        wrong["from"], wrong["to"] = fields["to"], fields["from"]
    elif kind == "daymonth":
        wrong["date"] = f"{dd}-{mm}"
    elif kind == "unpadded":  # "6-1" for June 1: no leading zeros
        wrong["date"] = f"{int(mm)}-{int(dd)}"
    elif kind == "written":
        wrong["date"] = written
    elif kind == "fence":
        return "```json\n" + json.dumps(fields, indent=2) + "\n```"
    else:
        return f"{fields['name']} is travelling from {fields['from']} to {fields['to']} on {written}."
    if wrong == fields:  # day == month ("daymonth") or both >= 10 ("unpadded") changes nothing
        wrong["date"] = written
    return answer(wrong)


def preference(rng) -> None:
    for name, count, pool in (("preference.jsonl", PREFERENCE_PAIRS, TRAIN),
                              ("preference_val.jsonl", PREFERENCE_VAL_PAIRS, HELD_OUT)):
        pairs = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                  "chosen": [{"role": "assistant", "content": out}],
                  "rejected": [{"role": "assistant", "content": rejected(rng, fields, written)}]}
                 for text, out, fields, written in unique_trips(rng, pool, count)]
        write_jsonl(name, pairs)


if __name__ == "__main__":
    sft(random.Random(2929))
    preference(random.Random(9292))  # its own generator: the SFT rows and checks stay as they are
