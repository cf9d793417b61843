"""A deterministic, LLM-free augmenter: QA pairs whose answers are passage spans, plus a rewrite.

Why it exists: tests, the demo and users without a GPU need augmented data in seconds with no
model. It is tuned for short encyclopedic passages ("X was born in 1854 in Y. She founded ...").

QA: each sentence (with a leading He/She resolved to the passage's main entity) yields candidate
questions from templates (born/died/capital/passive-with-year, "Who/What <predicate>?" for the
subject) and, for every date, year, number and named entity, an in-situ wh-question ("X founded
the Y in what year?"), so any passage with a name or number gets at least one pair. The answer is
always a span of the passage and ``full_answer`` is the (resolved) source sentence.

Rewrite: pronouns resolved, trailing time adverbials fronted ("..., in 1902." -> "In 1902, ..."),
a fixed synonym table applied to lowercase words only, and sentences after the first reordered.
Names and numbers are never edited, so every entity and number survives.

Everything is pure string code over lists (no sets iterated, no randomness): same input, same bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from offline_encode.augment.records import make_record, passage_of
from retrieval.corpus import Document

AUGMENTER_NAME = "rule"


@dataclass(frozen=True)
class RuleAugmenterConfig:
    n_rewrites: int = 1
    n_qa: int = 3
    include_title: str = "auto"  # see records.passage_of
    batch_size: int = 256  # documents per written batch (the resume granularity)


# ---------------------------------------------------------------------------------------------
# Lexical resources
MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December")
_DATE = (rf"(?:\d{{1,2}}\s+(?:{MONTHS})\s+\d{{3,4}}|(?:{MONTHS})\s+\d{{1,2}},?\s+\d{{3,4}}"
         rf"|(?:{MONTHS})\s+\d{{3,4}})")
DATE_RE = re.compile(rf"\b{_DATE}\b")
YEAR_RE = re.compile(r"(?<![\d,.])\b(1[0-9]{3}|20[0-9]{2})\b(?:\s?(?:BC|BCE|AD|CE)\b)?(?![\d,]\d)")
NUMBER_RE = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,]\d)%?|(?<![\w.,])\d+(?:\.\d+)?(?![\w.,]\d)%?")
NUMBER_WORDS_RE = re.compile(r"(?<![\w\-])(two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|"
                             r"hundred|thousand)(?= [a-z])")
DEFINITION_RE = re.compile(r"(?P<art>(?:The|A|An) )?(?P<x>[A-Za-z][^,;:()\"]{1,60}?) (?P<v>is|are|was|were) "
                           r"(?P<rest>(?:a|an|the|one) [^;:]+?)[.!]?$")
WORD_RE = re.compile(r"[^\W_][\w'’\-]*")
YEAR_CONTEXT = re.compile(r"(?:\b(?:in|since|until|till|by|from|of|to|during|before|after|around|circa|c\.|"
                          r"year|early|late|mid|between|and)\s*|[(–\-,]\s*)$", re.I)

STOP_CAPS = (
    "The A An In On At Of For From By With To As And But Or Nor So Yet If He She It They We You I His Her Its "
    "Their Our My This That These Those There Here After Before During When While Although Though Since Until "
    "Because However Today Also Then Later Now Between Among Under Over About Around According Following "
    "Despite Unlike Like Both Each Every Many Most Some Several Other Another Such Only First Its What Which "
    "Who Whom Where Why How Yes No Not").split()
CONNECTORS = ("of", "de", "von", "van", "der", "den", "du", "la", "le", "del", "da", "di", "the")
ORG_WORDS = (
    "Company Corporation Inc Ltd Glassworks Works Factory University College School Institute Academy "
    "Society Museum Library Church Cathedral Abbey Bridge River Lake Mountain Mount Island Islands Sea Ocean "
    "Valley Street Road Square Park Palace Castle Tower Hall Theatre Theater Hospital Bank Railway Station "
    "Party Council Republic Kingdom Empire Province County District Region City Town Village Harbour Port "
    "Award Prize Festival Club Team Army Navy Orchestra Press Times Journal Gazette Group Foundation Guild "
    "Mill Mills Brewery Observatory Canal Airport Market Union League Association Order Temple Cup").split()
PERSON_HINT = re.compile(r"\b(he|she|his|her|him|born|died|married|wife|husband|son|daughter)\b", re.I)
SUBJECT_PRONOUNS = {"He": "", "She": "", "His": "'s", "Her": "'s"}
FUNCTION_STARTS = ("The", "A", "An", "This", "That", "These", "Those", "Its", "There")
PLACE_NOUNS = ("town|city|village|country|region|province|county|island|river|lake|state|kingdom|"
               "district|valley|port|republic")

# Swaps applied to lowercase whole words in one pass (so a <-> b never swaps back).
SYNONYMS = {
    "founded": "established", "established": "founded", "built": "constructed", "constructed": "built",
    "began": "started", "started": "began", "begins": "starts", "starts": "begins",
    "large": "big", "big": "large", "small": "little", "famous": "well-known", "well-known": "famous",
    "located": "situated", "situated": "located", "named": "called", "called": "named",
    "many": "numerous", "numerous": "many", "several": "a number of", "important": "significant",
    "significant": "important", "largest": "biggest", "biggest": "largest", "near": "close to",
    "approximately": "roughly", "roughly": "approximately", "about": "around", "wrote": "authored",
    "authored": "wrote", "however": "nevertheless", "also": "additionally", "received": "was given",
    "created": "made", "opened": "inaugurated", "completed": "finished", "finished": "completed",
    "moved": "relocated", "relocated": "moved", "died": "passed away", "known": "recognised",
    "town": "municipality", "village": "settlement", "produced": "manufactured",
    "manufactured": "produced", "worked": "was employed", "leading": "prominent", "first": "earliest",
    "home": "residence", "lives": "resides", "lived": "resided", "won": "earned", "became": "grew into",
}
SYNONYM_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True)) + r")\b")
ABBREVIATIONS = ("mr mrs ms dr st jr sr prof gen col lt mt ft vs etc no inc ltd co c ca approx fig "
                 "rev sgt capt gov sen rep dept univ est").split()


# ---------------------------------------------------------------------------------------------
# Pure text functions
class Span(NamedTuple):
    kind: str  # date | year | number | entity
    start: int
    end: int
    text: str


def split_sentences(text: str) -> list[str]:
    """Sentence split that does not break after initials ("J.") or common abbreviations ("St.")."""
    out: list[str] = []
    for block in re.split(r"\n+", text):
        start = 0
        for m in re.finditer(r"[.!?]+[\"”’)\]]?\s+(?=[\"“(\[]?[A-Z0-9À-Þ])", block):
            before = block[start:m.start()].split()
            last = before[-1].rstrip(".").lower() if before else ""
            if m.group().startswith(".") and (len(last) == 1 and last.isalpha() or last in ABBREVIATIONS):
                continue
            out.append(block[start:m.end()].strip())
            start = m.end()
        if block[start:].strip():
            out.append(block[start:].strip())
    return [s for s in out if s]


def _overlaps(a: tuple[int, int], spans: list[Span]) -> bool:
    return any(a[0] < s.end and s.start < a[1] for s in spans)


def find_spans(sentence: str, known_caps: tuple[str, ...] = ()) -> list[Span]:
    """Dates, years, numbers and capitalised names in a sentence, non-overlapping, in text order."""
    spans: list[Span] = []
    for m in DATE_RE.finditer(sentence):
        spans.append(Span("date", m.start(), m.end(), m.group()))
    for m in YEAR_RE.finditer(sentence):
        if _overlaps(m.span(), spans):
            continue
        after = sentence[m.end():m.end() + 12]
        # "1200 workers" is a count, "in 1874" a year
        is_count = re.match(r"\s+[a-z]+", after) and not YEAR_CONTEXT.search(sentence[:m.start()]) \
            and not re.search(r"\b(?:the|a|an|his|her|its|their|this|that)\s+$", sentence[:m.start()], re.I)
        spans.append(Span("number" if is_count else "year", m.start(), m.end(), m.group()))
    for m in NUMBER_WORDS_RE.finditer(sentence):  # "divided into three areas": a countable fact
        spans.append(Span("number", m.start(), m.end(), m.group()))
    for m in NUMBER_RE.finditer(sentence):
        prev = re.search(r"([^\W\d_][\w'’\-]*) $", sentence[:m.start()])
        if prev and prev.group(1)[0].isupper() and prev.group(1) not in STOP_CAPS:
            continue  # "Deadpool 2", "Apollo 11": part of a name, not a quantity
        if not _overlaps(m.span(), spans):
            spans.append(Span("number", m.start(), m.end(), m.group()))
    words = [(m.start(), m.end(), m.group()) for m in WORD_RE.finditer(sentence)]
    i = 0
    while i < len(words):
        s, e, w = words[i]
        if not w[0].isupper() or _overlaps((s, e), spans):
            i += 1
            continue
        run = [i]
        j = i + 1
        while j < len(words):
            gap = sentence[words[j - 1][1]:words[j][0]]
            if gap != " " or _overlaps(words[j][:2], spans):
                break
            wj = words[j][2]
            if wj[0].isupper():
                run.append(j)
            elif wj in CONNECTORS and j + 1 < len(words) and words[j + 1][2][0].isupper() \
                    and sentence[words[j][1]:words[j + 1][0]] == " ":
                run.append(j)
            else:
                break
            j += 1
        i = j
        while run and (words[run[0]][2] in STOP_CAPS or words[run[0]][2] in CONNECTORS):
            run.pop(0)  # "The Dovanko Glassworks" -> "Dovanko Glassworks"
        while run and words[run[-1]][2] in CONNECTORS:
            run.pop()
        if not run:
            continue
        first_s, last_e = words[run[0]][0], words[run[-1]][1]
        if sentence[last_e - 2:last_e] in ("'s", "’s"):
            last_e -= 2  # possessive: the name is "Cylinder", not "Cylinder's"
        text = sentence[first_s:last_e]
        if len(run) == 1 and (first_s == 0 or not sentence[:first_s].strip(" \"“(")) \
                and text not in known_caps:
            continue  # a lone sentence-initial capital is usually just a capitalised word
        if text.upper() == text and len(text) == 1:
            continue
        spans.append(Span("entity", first_s, last_e, text))
    return sorted(spans, key=lambda sp: sp.start)


def known_capitals(sentences: list[str]) -> tuple[str, ...]:
    """Capitalised words seen away from a sentence start: a lone sentence-initial one is then a name."""
    seen: dict[str, None] = {}
    for sent in sentences:
        for m in WORD_RE.finditer(sent):
            if m.start() > 0 and m.group()[0].isupper() and m.group() not in STOP_CAPS:
                seen.setdefault(m.group(), None)
    return tuple(seen)


def main_entity(title: str, sentences: list[str], known: tuple[str, ...]) -> str | None:
    """What the passage is about: the title if the text names it, else the first sentence's subject."""
    joined = " ".join(sentences)
    if title and title in joined:
        return title
    if sentences:
        spans = find_spans(sentences[0], known)
        if spans and spans[0].kind == "entity" and not sentences[0][:spans[0].start].strip(" \"“(").strip():
            return spans[0].text
        # "The Dovanko Glassworks was ..." after a stripped article
        if spans and spans[0].kind == "entity" and sentences[0][:spans[0].start].strip() in FUNCTION_STARTS:
            return spans[0].text
    return None


IT_VERBS = re.compile(
    r"It(?= (?:has|had|lies|lay|covers|covered|borders|bordered|contains|contained|hosts|hosted|houses|"
    r"housed|includes|included|became|remains|remained|produces|produced|employs|employed|sits|stands|"
    r"stood|won|owns|owned|serves|served|flows|rises|(?:is|was) (?:a|an|the|located|situated|founded|built|"
    r"named|home|one|part|known|famous|situated|established|opened|closed)\b))")


def resolve_pronoun(sentence: str, entity: str | None, person: bool = True) -> str:
    """'She founded X.' -> 'Mirela Dovanko founded X.'; 'It has ...' -> 'Esterhalm has ...' for a thing.

    Only a sentence-initial pronoun is resolved, to the passage's main entity; "It" only before
    verbs that describe a place or organisation, so "It is said that ..." stays as it is.
    """
    if not entity:
        return sentence
    m = re.match(r"(He|She|His|Her)\b(?=\s)", sentence)
    if m and person:
        return entity + SUBJECT_PRONOUNS[m.group(1)] + sentence[m.end():]
    m = IT_VERBS.match(sentence)
    if m and not person:
        return entity + sentence[m.end():]
    return sentence


_FRONTED = re.compile(
    rf"(?P<adv>(?:In|On|During|After|Before|By|Since|Until|From|At|Around|Following|Throughout|Between) "
    rf"(?:{_DATE}|[^,;:()\"]{{1,60}}?)), (?P<body>\S.*?)(?P<end>[.!?]?)$")


def unfront_adverbial(sentence: str) -> str:
    """'In 1715, X was born in Y.' -> 'X was born in Y in 1715.' (the clause move keeps every word).

    Question templates read "<subject> <verb> ..." from the start of a sentence; a fronted
    adverbial would become part of the subject ("Where was In 1715, X born?").
    """
    m = _FRONTED.match(sentence)
    if not m or len(m.group("adv").split()) > 7:
        return sentence
    body, adv = m.group("body"), m.group("adv")
    return f"{body[:1].upper()}{body[1:]} {adv[:1].lower()}{adv[1:]}{m.group('end')}"


def is_person(entity: str, passage: str) -> bool:
    tokens = entity.split()
    return (2 <= len(tokens) <= 4 and all(t[0].isupper() for t in tokens)
            and tokens[-1] not in ORG_WORDS and tokens[0] not in ORG_WORDS
            and bool(PERSON_HINT.search(passage)))


def _as_question(text: str) -> str:
    text = text.strip().rstrip(".!?;:, ").strip()
    return text[:1].upper() + text[1:] + "?"


def _lower_start(text: str) -> str:
    """Lowercase a leading article/function word only (never a name)."""
    first = text.split(" ", 1)[0]
    return first.lower() + text[len(first):] if first in FUNCTION_STARTS else text


def _wh_for(span: Span, sentence: str, passage: str) -> tuple[int, str]:
    """(start of the text to replace, wh-phrase) for an in-situ question on ``span``."""
    before = sentence[:span.start]
    if span.kind in ("year", "date"):
        m = re.search(r"\b(in|on|since|until|by|from|during|before|after)\s+$", before, re.I)
        if span.kind == "date" and m and m.group(1).lower() == "on":
            return m.start(), "on what date"
        if m:
            return m.start(), f"{m.group(1)} what {'date' if span.kind == 'date' else 'year'}"
        return span.start, "what year" if span.kind == "year" else "what date"
    if span.kind == "number":
        return span.start, ("what percentage" if span.text.endswith("%") else "how many")
    m = re.search(rf"\bthe ({PLACE_NOUNS}) of\s+$", before, re.I)
    if m:
        return m.start(), f"which {m.group(1).lower()}"
    person = is_person(span.text, passage) or (re.search(r"\bby\s+$", before) is not None
                                               and is_person(span.text, "he"))
    if sentence[span.end:span.end + 2] in ("'s", "’s"):
        return span.start, "whose"
    m = re.search(r"\b(in|at|near|from)\s+(?:the\s+)?$", before)
    if m and not person and not span.text.isupper():
        return m.start(), f"{m.group(1)} which place"
    return span.start, "whom" if person else "what"


# Past-tense verbs whose base form we know: "X founded Y in 1902" -> "In what year did X found Y?"
PAST_LEMMAS = {
    "founded": "found", "established": "establish", "married": "marry", "worked": "work", "moved": "move",
    "built": "build", "wrote": "write", "won": "win", "joined": "join", "opened": "open", "designed": "design",
    "discovered": "discover", "invented": "invent", "studied": "study", "taught": "teach", "published": "publish",
    "composed": "compose", "painted": "paint", "led": "lead", "left": "leave", "lived": "live", "died": "die",
    "created": "create", "settled": "settle", "employed": "employ", "received": "receive", "started": "start",
    "began": "begin", "became": "become", "met": "meet", "visited": "visit", "ruled": "rule", "served": "serve",
    "directed": "direct", "produced": "produce", "recorded": "record", "released": "release", "had": "have",
    "played": "play", "signed": "sign", "bought": "buy", "sold": "sell", "lost": "lose", "made": "make",
    "named": "name", "trained": "train", "inherited": "inherit", "headed": "head",
}
_FRONT_VERB = re.compile(r"(?P<s>(?:The |the )?[^,;:()\"]+?) (?P<v>was|were|is|are|" +
                         "|".join(map(re.escape, PAST_LEMMAS)) + r")\b")
_MOVABLE_PREP = re.compile(r"\b(in|at|on|by|from|to|with|for|near|during|since|until)\s+$", re.I)


def _front_question(sent: str, start: int, end: int, wh: str) -> str | None:
    """Move the wh-phrase replacing ``sent[start:end]`` to the front, with do-support or inversion.

    "X married Y." -> "Who did X marry?"; "X was a potter in the city of Y." -> "In which city was
    X a potter?". None when the sentence is not "<short subject> <known verb> ..." with the phrase
    after the verb, so the caller keeps the in-situ form.
    """
    m = _FRONT_VERB.match(sent)
    if not m or m.end() > start or len(m.group("s").split()) > 6 or m.group("s").split()[0] in STOP_CAPS[1:] \
            or re.search(r"[,;:()—–\"]", sent.rstrip(".!?")):
        return None  # only simple clauses: moving a phrase out of a nested one garbles the question
    before = sent[m.end():start]
    if wh.split()[0] not in ("in", "on", "since", "until", "by", "from", "during"):
        prep = _MOVABLE_PREP.search(before)
        if re.search(r"\bthe\s+$", before):
            before = before[:re.search(r"\bthe\s+$", before).start()]
            prep = _MOVABLE_PREP.search(before)
        if prep:  # "in the city of X" -> "In which city ..."
            wh, before = f"{prep.group(1).lower()} {wh}", before[:prep.start()]
    if wh == "whom":  # fronted object: "Who did X marry?" ("by whom" keeps its case)
        wh = "who"
    middle = " ".join((before + " " + sent[end:]).split()).rstrip(".!?;: ").strip(" ,")
    subj, verb = _lower_start(m.group("s")), m.group("v")
    if verb in ("was", "were", "is", "are"):
        body = f"{verb} {subj}" + (f" {middle}" if middle else "")
    else:
        aux = "did"
        body = f"{aux} {subj} {PAST_LEMMAS[verb]}" + (f" {middle}" if middle else "")
    return _as_question(f"{wh} {body}")


class QACandidate(NamedTuple):
    priority: int
    question: str
    answer: str
    full_answer: str


def _template_questions(sent: str, spans: list[Span], passage: str) -> list[QACandidate]:
    out: list[QACandidate] = []
    times = [s for s in spans if s.kind in ("date", "year")]
    m = re.match(r"(?P<s>.+?) (?P<aux>was|were) born\b(?P<rest>.*)$", sent)
    if m:
        subj = _lower_start(m.group("s"))
        rest_spans = [s for s in spans if s.start >= m.start("rest")]
        for sp in rest_spans:
            if sp.kind in ("date", "year"):
                out.append(QACandidate(0, f"When {m.group('aux')} {subj} born?", sp.text, sent))
                break
        for sp in rest_spans:
            if sp.kind == "entity":
                out.append(QACandidate(0, f"Where {m.group('aux')} {subj} born?", sp.text, sent))
                break
    m = re.match(r"(?P<s>.+?) died\b(?P<rest>.*)$", sent)
    if m:
        subj = _lower_start(m.group("s"))
        for sp in spans:
            if sp.start >= m.start("rest") and sp.kind in ("date", "year"):
                out.append(QACandidate(0, f"When did {subj} die?", sp.text, sent))
                break
    m = re.match(rf"(?P<x>[A-Z][^,;]*?) (?P<v>is|was) the capital(?: city)? of (?P<y>[A-Z][^,;]*?)[.!]?$", sent)
    if m and len(m.group("x").split()) <= 5:
        x = m.group("x").removeprefix("The ")
        out.append(QACandidate(0, f"What {m.group('v')} the capital of {m.group('y')}?", x, sent))
    m = re.match(r"(?P<s>[^,]+?) (?P<aux>was|were|is|are|has been|had been) (?P<pp>[a-z]+(?:ed|en|lt|wn|de|ght))"
                 r"\b(?P<mid>[^,]*?),? in (?P<t>\S.*?)[.!]?$", sent)
    if m and m.group("pp") != "born":
        t_start = m.start("t")
        for sp in times:
            if sp.start == t_start:
                what = "what year" if sp.kind == "year" else "what date"
                q = f"In {what} {m.group('aux')} {_lower_start(m.group('s'))} {m.group('pp')}{m.group('mid')}?"
                out.append(QACandidate(0, q, sp.text, sent))
                break
    return out


def qa_candidates(sentences: list[str], passage: str, known: tuple[str, ...]) -> list[list[QACandidate]]:
    """Per sentence, its candidate QA pairs best-first (templates, subject question, in-situ)."""
    result: list[list[QACandidate]] = []
    for sent in sentences:
        spans = find_spans(sent, known)
        cands = _template_questions(sent, spans, passage)
        subj = spans[0] if spans and spans[0].kind == "entity" and sent[:spans[0].start].strip() in ("", "The") \
            else None
        if subj is not None:
            rest = sent[subj.end:]
            if re.match(r" [a-z]", rest) and not rest.startswith(" of "):
                wh = "Who" if is_person(subj.text, passage) else "What"
                cands.append(QACandidate(1, _as_question(wh + rest), subj.text, sent))
        m = DEFINITION_RE.match(sent)
        if m and subj is None and len(m.group("x").split()) <= 6 \
                and m.group("x").split()[0] not in STOP_CAPS:  # "The uvea is the middle layer of the eye."
            wh = "Who" if is_person(m.group("x"), passage) else "What"
            cands.append(QACandidate(1, f"{wh} {m.group('v')} {m.group('rest')}?", m.group("x"), sent))
        for sp in spans:
            if sp is subj:
                continue
            start, wh = _wh_for(sp, sent, passage)
            end = sp.end + (2 if wh == "whose" else 0)
            if sp.kind == "number" and not sp.text.endswith("%"):
                unit = re.match(r" ([a-z][a-z\-]+)", sent[end:])
                if unit:  # "how many workers"
                    wh, end = f"how many {unit.group(1)}", end + unit.end()
                else:
                    wh = "what number"
            q = (_front_question(sent, start, end, wh) if wh != "what number" else None) \
                or _as_question(sent[:start] + wh + sent[end:])
            prio = 2 if sp.kind in ("year", "date", "number") else 3
            cands.append(QACandidate(prio, q, sp.text, sent))
        cands.sort(key=lambda c: c.priority)  # stable: text order within a priority
        result.append(cands)
    return result


def select_qa(per_sentence: list[list[QACandidate]], n: int) -> list[QACandidate]:
    """Round-robin over sentences (one fact each first), preferring new answers, then any."""
    chosen: list[QACandidate] = []
    questions: list[str] = []
    answers: list[str] = []
    for allow_repeat_answer in (False, True):
        depth = 0
        while len(chosen) < n and any(depth < len(c) for c in per_sentence):
            for cands in per_sentence:
                if len(chosen) >= n:
                    break
                for cand in cands[depth:]:
                    if cand.question in questions:
                        continue
                    if not allow_repeat_answer and cand.answer.lower() in answers:
                        continue
                    chosen.append(cand)
                    questions.append(cand.question)
                    answers.append(cand.answer.lower())
                    break
            depth += 1
    return chosen[:n]


def _front_time(sentence: str) -> str:
    """'X did Y in 1902.' <-> 'In 1902, X did Y.' (the clause move keeps every word)."""
    n_times = len(DATE_RE.findall(sentence)) + len(YEAR_RE.findall(DATE_RE.sub("", sentence)))
    core = re.sub(rf"^(?:In|On) (?:{_DATE}|\d{{4}}), ", "", DATE_RE.sub("DATE", sentence))
    if n_times != 1 or re.search(r"[,;:()—–]|\b(?:which|who|whom|whose|that|and|or|but|while)\b", core):
        return sentence  # the adverbial might belong to a nested clause: moving it could change facts
    m = re.match(rf"(?P<body>.+?) (?P<adv>(?:in|on) (?:{_DATE}|(?:1[0-9]{{3}}|20[0-9]{{2}})))(?P<end>[.!?]?)$",
                 sentence)
    if m and len(m.group("body").split()) >= 2:
        adv = m.group("adv")
        return adv[0].upper() + adv[1:] + ", " + _lower_start(m.group("body")) + m.group("end")
    m = re.match(rf"(?P<adv>(?:In|On) (?:{_DATE}|(?:1[0-9]{{3}}|20[0-9]{{2}}))), (?P<body>.+?)(?P<end>[.!?]?)$",
                 sentence)
    if m:
        body = m.group("body")
        body = body[0].upper() + body[1:] if body.split(" ", 1)[0].lower() in ("the", "a", "an", "this", "its") \
            else body
        return body + " " + m.group("adv")[0].lower() + m.group("adv")[1:] + m.group("end")
    return sentence


def _swap_synonyms(sentence: str) -> str:
    return SYNONYM_RE.sub(lambda m: SYNONYMS[m.group(1)], sentence)


def make_rewrite(sentences: list[str], entity: str | None, person: bool = True, variant: int = 0) -> str:
    """Reordered, pronoun-resolved, clause-moved, synonym-swapped version keeping names and numbers."""
    sents = [resolve_pronoun(s, entity, person) if i > 0 else s for i, s in enumerate(sentences)]
    sents = [_front_time(s) for s in sents]
    if variant % 2 == 0:
        sents = [_swap_synonyms(s) for s in sents]
    head, rest = sents[:1], sents[1:]
    if rest:
        k = variant % len(rest)
        rest = list(reversed(rest)) if variant == 0 else rest[k:] + rest[:k]
    out = " ".join(head + rest)
    if " ".join(out.split()) == " ".join(" ".join(sentences).split()):
        out = "In summary, " + _lower_start(out)
    return out


# ---------------------------------------------------------------------------------------------
class RuleAugmenter:
    """Deterministic augmenter; ``augment_documents`` is the unit a Ray task can run on a shard."""

    name = AUGMENTER_NAME
    model: str | None = None

    def __init__(self, cfg: RuleAugmenterConfig = RuleAugmenterConfig()):
        from prag.errors import PragError

        if cfg.n_qa < 1 or cfg.n_rewrites < 0:
            raise PragError(f"n_qa must be >= 1 and n_rewrites >= 0 (got {cfg.n_qa}, {cfg.n_rewrites})")
        self.cfg = cfg
        self.batch_size = cfg.batch_size

    def augment_one(self, doc: Document) -> dict:
        passage = passage_of(doc, self.cfg.include_title)
        text = doc.text.strip()
        # Facts come from the text; a title prefix added by passage_of is kept verbatim up front.
        prefix = passage[: len(passage) - len(text)] if passage.endswith(text) else ""
        sentences = split_sentences(text)
        title = doc.title.strip()
        known = known_capitals(sentences) + ((title,) + tuple(title.split()) if title in text else ())
        entity = main_entity(title if title in text else "", sentences, known)
        person = bool(entity) and is_person(entity, passage)
        resolved = [resolve_pronoun(unfront_adverbial(s), entity, person) for s in sentences]
        qa = select_qa(qa_candidates(resolved, passage, known), self.cfg.n_qa)
        qa = [c for c in qa if c.answer in passage]  # answers are spans of the passage, always
        rewrites = [prefix + make_rewrite(sentences, entity, person, v) for v in range(self.cfg.n_rewrites)]
        if not qa:
            return make_record(doc.id, passage, rewrites, [], self.name, self.model,
                               error="no_extractable_facts: no names, dates or numbers found in the passage")
        pairs = [{"question": c.question, "answer": c.answer, "full_answer": c.full_answer} for c in qa]
        return make_record(doc.id, passage, rewrites, pairs, self.name, self.model)

    def augment_documents(self, docs: list[Document]) -> list[dict]:
        """One record per document, in order; an unexpected failure becomes that document's error."""
        out = []
        for doc in docs:
            try:
                out.append(self.augment_one(doc))
            except Exception as exc:  # per-document failures never abort the run
                out.append(make_record(doc.id, doc.text, [], [], self.name, self.model,
                                       error=f"internal_error: {type(exc).__name__}: {exc}"))
        return out
