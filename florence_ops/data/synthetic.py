"""Synthetic DocVQA-style documents: the offline default data source.

Each page is an invoice, receipt, form, letter or report (a report with a table), issued by one of a small closed set
of fictitious companies, rendered by `synthetic_layouts`. Records follow the schema of `HuggingFaceM4/DocumentVQA`.

Question types, named in DocVQA's spirit, and what they ask here:

| type          | easy | asks                                                        | answer printed as              |
| ------------- | ---- | ----------------------------------------------------------- | ------------------------------ |
| `layout`      | yes  | the kind of document                                        | the big title, e.g. INVOICE    |
| `Image/Photo` | yes  | the issuing company (closed set of 7)                       | big name, coloured logo block  |
| `Yes/No`      | yes  | is the page signed / is the big URGENT box ticked           | a scribble / a red X           |
| `form`        | no   | key-value fields: numbers, dates, names, IDs                | normal-size text               |
| `table/list`  | no   | table cells, line items, totals                             | normal-size text               |
| `free_text`   | no   | a fact inside a sentence of running text                    | normal-size text               |

The easy types are answerable from a 256-384 px thumbnail, so a tiny model shows learning within minutes of CPU
training; about `EASY_SHARE` of the questions are easy, and metrics should be reported per type. Each document is
drawn from its own RNG seeded by a stable hash of (seed, split, index), so output is identical across processes and
document i does not depend on how many documents are generated.
"""

import calendar
import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from florence_ops.data.synthetic_layouts import COMPANIES, NBSP, Box, CompanyStyle, DocumentContent, render_document

logger = logging.getLogger(__name__)

EASY_TYPES: tuple[str, ...] = ("layout", "Image/Photo", "Yes/No")
HARD_TYPES: tuple[str, ...] = ("form", "table/list", "free_text")
QUESTION_TYPES: tuple[str, ...] = EASY_TYPES + HARD_TYPES
EASY_SHARE = 0.55  # target share of easy questions per document
TYPE_WEIGHTS = {"layout": 1.0, "Image/Photo": 1.0, "Yes/No": 1.0, "form": 0.8, "table/list": 1.3, "free_text": 0.7}
SPLIT_OFFSETS = {"train": 1, "validation": 2, "test": 3}
DOC_ID_STRIDE = 1_000_000  # docIds of a split are offset * stride + index, so splits never overlap
KINDS: tuple[str, ...] = ("invoice", "receipt", "form", "letter", "report")

FIRST_NAMES = ("James", "Mary", "Robert", "Linda", "David", "Susan", "Maria", "Ahmed", "Wei", "Priya", "Carlos", "Anna")
LAST_NAMES = ("Smith", "Johnson", "Garcia", "Chen", "Patel", "Kowalski", "Nguyen", "Brown", "Rossi", "Okafor", "Lee")
CITIES = ("Boston", "Denver", "Austin", "Seattle", "Chicago", "Toronto", "Dublin", "Lyon", "Porto", "Oslo", "Madrid")
ITEMS = ("Printer paper", "Toner", "Desk lamp", "USB cable", "Office chair", "Stapler", "Monitor stand", "Notebooks")
ITEMS += ("Coffee beans", "Envelopes", "Keyboard", "Markers", "Headset", "Binders", "Batteries", "Label tape")
DEPARTMENTS = ("Finance", "Marketing", "Research", "Logistics", "Sales", "Legal", "Operations", "Facilities")
REGIONS = ("North", "South", "East", "West", "Central", "Online")


# Question phrasings per fact: its type, then 1-3 templates filled from the fact's parameters.
QUESTION_BANK: dict[str, tuple[str, ...]] = {
    "kind": ("layout", "What type of document is this?", "What kind of document is shown?", "What is this document?"),
    "company": ("Image/Photo", "Which company issued this document?", "What is the name of the company in the logo?"),
    "signed": ("Yes/No", "Is the document signed?", "Has this document been signed?", "Is there a signature?"),
    "urgent": ("Yes/No", "Is the 'urgent' box checked?", "Is the URGENT box ticked?", "Is it marked as urgent?"),
    "invoice_no": ("form", "What is the invoice number?", "What is the number of this invoice?"),
    "invoice_date": ("form", "What is the invoice date?", "On what date was the invoice issued?"),
    "due_date": ("form", "What is the due date of the invoice?", "By what date must the invoice be paid?"),
    "bill_to": ("form", "Who is the invoice billed to?", "What is the customer's name?"),
    "line_amount": ("table/list", "What is the amount for {item}?", "How much was charged for {item}?"),
    "line_qty": ("table/list", "What quantity of {item} was invoiced?"),
    "invoice_total": ("table/list", "What is the total amount?", "What is the invoice total?"),
    "subtotal": ("table/list", "What is the subtotal?"),
    "payment_days": ("free_text", "Within how many days is payment due?"),
    "reference": ("free_text", "Which reference should be quoted with the payment?"),
    "receipt_no": ("form", "What is the receipt number?", "What number does this receipt have?"),
    "receipt_date": ("form", "What is the date on the receipt?", "On what date was the purchase made?"),
    "receipt_time": ("form", "At what time was the purchase made?", "What time is printed on the receipt?"),
    "cashier": ("form", "Who was the cashier?", "What is the cashier's name?"),
    "price": ("table/list", "What was the price of {item}?", "How much did the {item} cost?"),
    "receipt_total": ("table/list", "What is the total?", "How much was paid in total?"),
    "return_days": ("free_text", "Within how many days are returns accepted?"),
    "store_city": ("free_text", "In which city is the store?", "Where is the store located?"),
    "applicant": ("form", "What is the applicant's name?", "Whose name is entered on the form?"),
    "birth_date": ("form", "What is the date of birth?", "When was the applicant born?"),
    "employee_id": ("form", "What is the employee ID?", "Which employee ID is given?"),
    "department": ("form", "Which department is entered on the form?", "What department is given?"),
    "phone": ("form", "What phone number is given?", "What is the applicant's phone number?"),
    "leave_days": ("free_text", "How many days of leave are requested?"),
    "leave_start": ("free_text", "When does the requested leave start?", "On what date does the leave begin?"),
    "letter_date": ("form", "What is the date of the letter?", "When was the letter written?"),
    "recipient": ("form", "To whom is the letter addressed?", "Who is the recipient of the letter?"),
    "meeting_city": ("free_text", "In which city is the meeting held?", "Where will the meeting take place?"),
    "meeting_date": ("free_text", "On what date is the meeting?", "When will the review meeting take place?"),
    "participants": ("free_text", "How many participants are expected?"),
    "budget": ("free_text", "What is the proposed budget?", "How large is the proposed budget?"),
    "report_no": ("form", "What is the report number?"),
    "author": ("form", "Who prepared the report?", "Who is the author of the report?"),
    "report_date": ("form", "What is the date of the report?", "When was the report prepared?"),
    "growth": ("free_text", "By what percentage did sales grow?"),
    "sales_year": ("free_text", "Which year does the sales summary cover?"),
    "cell": ("table/list", "What were the {quarter} sales for {region}?", "What is the {quarter} value for {region}?"),
}


@dataclass(frozen=True)
class Fact:
    """One answerable fact about a page: its question type, phrasings of the question and accepted answers."""

    question_type: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]


def fact(key: str, answers: str | tuple[str, ...], **params: str) -> Fact:
    """The fact `key` of `QUESTION_BANK` with its templates filled from `params`."""
    question_type, *templates = QUESTION_BANK[key]
    answers = (answers,) if isinstance(answers, str) else answers
    return Fact(question_type, tuple(t.format(**params) for t in templates), answers)


@dataclass
class SyntheticDocument:
    """A rendered page with the facts it supports and the lines of text drawn on it."""

    doc_id: int
    content: DocumentContent
    image: Image.Image
    lines: list[tuple[str, Box]]
    facts: list[Fact]


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from `parts` that, unlike `hash()`, is the same in every process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(2015, 2024), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        return f"{calendar.month_name[month]} {day}, {year}"
    return f"{month:02d}/{day:02d}/{year}" if style == 1 else f"{year}-{month:02d}-{day:02d}"


def _money(cents: int) -> tuple[str, ...]:
    return (f"${cents / 100:,.2f}", f"{cents / 100:,.2f}")


def _glue(text: str) -> str:
    return text.replace(" ", NBSP)


Content = tuple[list[tuple[str, str]], list[list[str]], list[str], list[Fact]]  # fields, table, paragraphs, facts


def _invoice(rng: random.Random) -> Content:
    number, date, due, customer = f"INV-{rng.randint(10000, 99999)}", _date(rng), _date(rng), _name(rng)
    fields = [("Invoice No.", number), ("Date", date), ("Due date", due), ("Bill to", customer)]
    facts = [fact("invoice_no", number), fact("invoice_date", date), fact("due_date", due), fact("bill_to", customer)]
    rows, subtotal = [["Description", "Qty", "Unit price", "Amount"]], 0
    for item in rng.sample(ITEMS, rng.randint(3, 5)):
        qty, unit = rng.randint(1, 12), rng.randint(150, 30000)
        subtotal += qty * unit
        rows.append([item, str(qty), _money(unit)[0], _money(qty * unit)[0]])
        facts += [
            fact("line_amount", _money(qty * unit), item=item.lower()),
            fact("line_qty", str(qty), item=item.lower()),
        ]
    rate = rng.randint(5, 10)
    tax = subtotal * rate // 100
    rows += [["Subtotal", "", "", _money(subtotal)[0]], [f"Tax ({rate}%)", "", "", _money(tax)[0]]]
    rows.append(["Total", "", "", _money(subtotal + tax)[0]])
    days, ref = rng.choice((14, 30, 45, 60)), f"{rng.choice('ABCKPR')}{rng.randint(1000, 9999)}"
    paragraphs = [
        f"Payment is due within {days}{NBSP}days of the invoice date.",
        f"Please quote reference {ref} with your payment. Thank you for your business.",
    ]
    facts += [fact("invoice_total", _money(subtotal + tax)), fact("subtotal", _money(subtotal))]
    facts += [fact("payment_days", (f"{days} days", str(days))), fact("reference", ref)]
    return fields, rows, paragraphs, facts


def _receipt(rng: random.Random) -> Content:
    number, date, cashier = str(rng.randint(100000, 999999)), _date(rng), rng.choice(FIRST_NAMES)
    time = f"{rng.randint(8, 21):02d}:{rng.randint(0, 59):02d}"
    fields = [("Receipt No.", number), ("Date", date), ("Time", time), ("Cashier", cashier)]
    facts = [
        fact("receipt_no", number),
        fact("receipt_date", date),
        fact("receipt_time", time),
        fact("cashier", cashier),
    ]
    rows, total = [["Item", "Price"]], 0
    for item in rng.sample(ITEMS, rng.randint(3, 6)):
        price = rng.randint(99, 9999)
        total += price
        rows.append([item, _money(price)[0]])
        facts.append(fact("price", _money(price), item=item.lower()))
    rows.append(["Total", _money(total)[0]])
    days, city = rng.choice((7, 14, 28, 30, 90)), rng.choice(CITIES)
    paragraphs = [f"Thank you for shopping at our {city} store!", f"Returns accepted within {days}{NBSP}days."]
    facts += [fact("receipt_total", _money(total)), fact("return_days", (f"{days} days", str(days)))]
    facts.append(fact("store_city", city))
    return fields, rows, paragraphs, facts


def _form(rng: random.Random) -> Content:
    name, birth, department = _name(rng), _date(rng), rng.choice(DEPARTMENTS)
    employee, phone = f"E-{rng.randint(10000, 99999)}", f"{rng.randint(200, 989)}-555-{rng.randint(1000, 9999)}"
    fields = [("Full name", name), ("Date of birth", birth), ("Employee ID", employee)]
    fields += [("Department", department), ("Phone", phone)]
    facts = [fact("applicant", name), fact("birth_date", birth), fact("employee_id", employee)]
    facts += [fact("department", department), fact("phone", phone)]
    days, start = rng.randint(2, 20), _date(rng)
    text = f"The employee requests {days}{NBSP}days of leave starting {_glue(start)}. Manager approval is required."
    facts += [fact("leave_days", (f"{days} days", str(days))), fact("leave_start", start)]
    return fields, [], [text], facts


def _letter(rng: random.Random) -> Content:
    date, recipient, street = _date(rng), _name(rng), f"{rng.randint(1, 999)} {rng.choice(LAST_NAMES)} Street"
    town = f"{rng.choice(CITIES)} {rng.randint(10000, 99999)}"
    fields = [("Date", date), ("To", recipient), ("Street", street), ("City", town)]
    city, meeting, budget, people = rng.choice(CITIES), _date(rng), rng.randint(100, 5000) * 1000, rng.randint(12, 250)
    paragraphs = [
        f"Dear {recipient.split()[0]},",
        f"We are pleased to invite you to our annual review meeting in {_glue(city)} on {_glue(meeting)}.",
        f"Around {people}{NBSP}participants are expected to attend.",
        f"The proposed budget for the new project is {_money(budget)[0]}. We look forward to your feedback.",
    ]
    facts = [fact("letter_date", date), fact("recipient", recipient), fact("meeting_city", city)]
    facts += [fact("meeting_date", meeting), fact("participants", (f"{people} participants", str(people)))]
    facts.append(fact("budget", _money(budget)))
    return fields, [], paragraphs, facts


def _report(rng: random.Random) -> Content:
    number, author, date = f"RPT-{rng.randint(1000, 9999)}", _name(rng), _date(rng)
    fields = [("Report No.", number), ("Prepared by", author), ("Date", date)]
    growth, year = rng.randint(2, 40), rng.randint(2015, 2024)
    paragraphs = [f"Sales in {year} grew by {growth}% compared with the previous year across all regions."]
    facts = [fact("report_no", number), fact("author", author), fact("report_date", date)]
    facts += [fact("growth", (f"{growth}%", str(growth))), fact("sales_year", str(year))]
    quarters = ("Q1", "Q2", "Q3", "Q4")[: rng.randint(3, 4)]
    rows = [["Region", *quarters]]
    for region in rng.sample(REGIONS, rng.randint(3, 5)):
        values = [f"{rng.randint(100, 9999):,}" for _ in quarters]
        rows.append([region, *values])
        for quarter, value in zip(quarters, values, strict=True):
            facts.append(fact("cell", (value, value.replace(",", "")), quarter=quarter, region=region))
    return fields, rows, paragraphs, facts


BUILDERS = {"invoice": _invoice, "receipt": _receipt, "form": _form, "letter": _letter, "report": _report}


def _visual_facts(kind: str, company: CompanyStyle, signed: bool, urgent: bool) -> list[Fact]:
    article = "an" if kind[0] in "aeiou" else "a"
    return [
        fact("kind", (kind, kind.upper(), f"{article} {kind}")),
        fact("company", (company.name, company.name.lower())),
        fact("signed", "yes" if signed else "no"),
        fact("urgent", "yes" if urgent else "no"),
    ]


def make_document(split: str, index: int, seed: int) -> SyntheticDocument:
    """Build and render document `index` of `split`; depends only on (split, index, seed)."""
    rng = random.Random(stable_seed("document", seed, split, index))
    kind, company = rng.choice(KINDS), rng.choice(COMPANIES)
    fields, rows, paragraphs, facts = BUILDERS[kind](rng)
    signed, urgent = rng.random() < 0.5, rng.random() < 0.5
    content = DocumentContent(kind, company, fields, rows, paragraphs, _name(rng), signed, urgent)
    image, lines = render_document(content, rng)
    facts = _visual_facts(kind, company, signed, urgent) + facts
    return SyntheticDocument(SPLIT_OFFSETS[split] * DOC_ID_STRIDE + index, content, image, lines, facts)


def _weighted_pick(pool: list[Fact], k: int, rng: random.Random) -> list[Fact]:
    remaining, picked = list(pool), []
    for _ in range(k):
        types = sorted({f.question_type for f in remaining})
        chosen_type = rng.choices(types, weights=[TYPE_WEIGHTS[t] for t in types])[0]
        chosen = rng.choice([f for f in remaining if f.question_type == chosen_type])
        remaining.remove(chosen)
        picked.append(chosen)
    return picked


def select_facts(facts: list[Fact], n: int, rng: random.Random) -> list[Fact]:
    """Pick `n` distinct facts, about `EASY_SHARE` of them easy, types weighted by `TYPE_WEIGHTS`."""
    easy = [f for f in facts if f.question_type in EASY_TYPES]
    hard = [f for f in facts if f.question_type not in EASY_TYPES]
    wanted = n * EASY_SHARE
    n_easy = min(len(easy), int(wanted) + (rng.random() < wanted - int(wanted)))
    n_hard = min(len(hard), n - n_easy)
    n_easy = min(len(easy), n - n_hard)
    picked = _weighted_pick(easy, n_easy, rng) + _weighted_pick(hard, n_hard, rng)
    rng.shuffle(picked)
    return picked


def generate_split(split: str, n_documents: int, seed: int, *, questions_per_document: int = 4) -> Iterator[dict]:
    """Yield DocumentVQA-schema records for one split, document by document."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    if not 0 <= n_documents < DOC_ID_STRIDE:
        raise ValueError(f"n_documents must be in [0, {DOC_ID_STRIDE}), got {n_documents}")
    if questions_per_document < 1:
        raise ValueError(f"questions_per_document must be >= 1, got {questions_per_document}")
    logger.debug("generating %d synthetic %s documents (seed %d)", n_documents, split, seed)
    return _records(split, n_documents, seed, questions_per_document)  # arguments fail here, not at first next()


def _records(split: str, n_documents: int, seed: int, questions_per_document: int) -> Iterator[dict]:
    for index in range(n_documents):
        document = make_document(split, index, seed)
        yield from document_records(document, split, index, seed, questions_per_document)


def document_records(document: SyntheticDocument, split: str, index: int, seed: int, questions: int) -> list[dict]:
    """The question records of document `index` of `split` (rendered as `document`), its image in each."""
    rng = random.Random(stable_seed("questions", seed, split, index))
    return [
        {
            "questionId": f"{document.doc_id}-{number}",
            "question": rng.choice(chosen.questions),
            "question_types": [chosen.question_type],
            "image": document.image,
            "docId": document.doc_id,
            "ucsf_document_id": f"synth{document.doc_id}",
            "ucsf_document_page_no": "1",
            "answers": list(chosen.answers),
        }
        for number, chosen in enumerate(select_facts(document.facts, questions, rng))
    ]
