"""The text rules behind the quick path's shipped data (dataset/make_shipped_data.py writes the files).

Each rule is a pure function on strings, so a test can check it on a hand-written text:

    repair_text      mojibake and typographic punctuation -> ASCII (TinyStories has both, the books curly quotes)
    recover_stories  story boundaries in an export of TinyStories that has no story separator
    truecase         original casing back on the lower-cased TinyStories copy (a table learned from cased stories)
    book_documents   a Project Gutenberg book -> chapters -> documents of about 1,500 characters
    story_subject    what a story is about, for the request an SFT sample pairs it with ("... about a cat.")
    opens_on_subject whether a story's first sentence names that subject (the SFT set keeps only those)

The rules, their measured accuracy and the counts they give are in dataset/data/ATTRIBUTION.md.
"""

import re
from collections import Counter, defaultdict

# UTF-8 curly quotes and dashes decoded as Windows-1252 ("â€œ" for "“"). The right double quote's last byte
# (0x9d) has no Windows-1252 character and was lost, so a bare "â€" is a right double quote; it is replaced last.
MOJIBAKE = [("â€œ", '"'), ("â€\x9d", '"'), ("â€™", "'"), ("â€˜", "'"), ("â€“", "-"),
            ("â€”", " - "), ("â€¦", "..."), ("â€", '"')]
# The rest of the corpus writes ASCII quotes and dashes; one spelling per sign keeps the tokens few.
TYPOGRAPHY = {"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": " - ", "…": "..."}
BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")

# --- story boundaries -------------------------------------------------------------------------------------
# A paragraph opens a story when it starts with one of these (none of the 4,666 later paragraphs of stories in
# the original-case train head, whose story boundaries are known, starts so; see ATTRIBUTION.md).
STORY_OPENER = re.compile(r"Once,? (?:upon|there)\b|It was a [a-z]+ (?:day|morning|night)\b"
                          r"|One day,? there (?:was|were)\b")
# A paragraph led by a proper name (and maybe a second one): "Lily and Ben ...", "Tom ..."
NAME_LED = re.compile(r"([A-Z][a-z]+)(?: and ([A-Z][a-z]+))?\b")
# ... that introduces its characters, which a later paragraph of a story seldom does ("Lily and Ben are twins.")
INTRODUCTION = re.compile(
    r"[A-Z][a-z]+(?: and [A-Z][a-z]+)? "
    r"(?:(?:are|were) (?:best )?(?:friends|twins|brothers?|sisters?|cousins|neighbors)\b"
    r"|(?:are|were) (?:playing|having|in|at|going)\b|(?:is|was) (?:walking|playing)\b"
    r"|(?:is|was) (?:a|an) (?:little|small|big|young|happy|good|kind|curious|three|four|five)\b"
    r"|(?:liked|loved|likes|loves) to\b)")
# A line that goes on with the story it follows: a quote, a lower-case letter, a pronoun or a connective.
CONTINUATION = re.compile(r"[\"'(a-z]|(?:And|But|So|Then|Suddenly|They|He|She|His|Her|Their|We|You|After|When|"
                          r"Finally|Later|Soon|Now|From|As|That|This|Everyone|Together|Meanwhile|Just|Still|Yes|"
                          r"No|Oh|The end|The End|End)\b")
LINE_BREAKS = re.compile(r"(\n(?:[ \t]*\n)*)")  # a single newline, or a paragraph break (with blank lines)
# A story is never cut before it has this many characters: shorter stories are rare (TinyStories are 3 to 5
# paragraphs), and a cut there would leave a line of dialogue or a title as a "story".
MIN_STORY_CHARS = 300


def repair_text(text: str) -> str:
    """Mojibake and typographic quotes, apostrophes, dashes and ellipses as ASCII; runs of spaces as one."""
    for broken, sign in MOJIBAKE:
        text = text.replace(broken, sign)
    for typographic, sign in TYPOGRAPHY.items():
        text = text.replace(typographic, sign)
    return re.sub(r"(?<=\S) {2,}(?=\S)", " ", text)


def proper_names(texts: list[str]) -> set[str]:
    """Lower-cased words written capitalized inside a sentence (after a lower-case word or a comma) at least
    twice and more often than in lower case: the names of a corpus ("lily", "ben", "spot"; not "the", "mom")."""
    capitalized, lower = Counter(), Counter()
    for text in texts:
        for match in re.finditer(r"(?<=[a-z,;] )[A-Za-z]+\b", text):
            word = match.group(0)
            (capitalized if word[0].isupper() else lower)[word.lower()] += 1
    return {word for word, count in capitalized.items() if count >= 2 and count > lower[word]}


def opens_story(paragraph: str, story: str, names: set[str]) -> bool:
    """Whether `paragraph`, which follows the text `story` so far, starts a new story: it opens like one
    (STORY_OPENER), or it is led by a proper name of `names` and either introduces its characters or names only
    characters that `story` never mentions."""
    if STORY_OPENER.match(paragraph):
        return True
    lead = NAME_LED.match(paragraph)
    if not lead or lead.group(1).lower() not in names:
        return False
    if INTRODUCTION.match(paragraph):
        return True
    characters = [name for name in lead.groups() if name and name.lower() in names]
    return not any(re.search(rf"\b{name}\b", story) for name in characters)


def recover_stories(text: str, names: set[str], newline_separates: bool,
                    min_chars: int = MIN_STORY_CHARS) -> list[str]:
    """Cut an export of TinyStories into its stories.

    Args:
        text: stories one after another; inside a story, paragraphs are separated by a blank line, and a few
            stories also break lines with a single newline (dialogue, rhymes).
        names: proper names of the corpus (proper_names), for opens_story.
        newline_separates: the export ended every story with one newline (the train head): a single newline is
            a story boundary unless it is a line break inside a story (the line before it ends in a space, or
            the line after it starts like a continuation, CONTINUATION). False when stories are separated by a
            blank line like paragraphs (the validation head): only opens_story finds the boundaries.
        In both cases a paragraph that opens_story is a boundary too.
        min_chars: no story is cut before it has this many characters.
    Returns:
        the stories in order, paragraphs joined by a blank line, lines inside a paragraph by a newline, each
        line stripped of surrounding spaces.
    """
    pieces = LINE_BREAKS.split(text)  # [line, break, line, break, ..., line]
    stories, story, previous_line = [], "", ""
    for index in range(0, len(pieces), 2):
        block = pieces[index].strip()
        if not block:
            continue
        line_break = index > 0 and pieces[index - 1] == "\n"
        separator_here = (newline_separates and line_break and not previous_line.endswith((" ", "\t"))
                          and not CONTINUATION.match(block))
        if len(story) >= min_chars and (separator_here or opens_story(block, story, names)):
            stories.append(story)
            story = ""
        joiner = "\n" if line_break else "\n\n"
        story = story + joiner + block if story else block
        previous_line = pieces[index]
    if story:
        stories.append(story)
    return stories


# --- true-casing --------------------------------------------------------------------------------------------
WORD = re.compile(r"[A-Za-z]+")
# what precedes a sentence-initial word: the text's start, an end of sentence (maybe closed by a quote), a
# newline, or an opening quote. Capitals there say nothing about a word's own casing.
SENTENCE_INITIAL = re.compile(r'(?:^|[.!?]["\')]*\s+|\n\s*|")$')
SENTENCE_START = re.compile(r'(^|[.!?]["\')]*\s+|\n\s*|(?<=[\s(])"|^")([a-z])')
# '"Where?" asked Tim.' / '"Hi!" she said.': the word after a closing quote stays lower-case before a speech verb
SPEECH_VERB = re.compile(r"(?:[a-z]+ )?(?:said|asked|replied|shouted|cried|exclaimed|whispered|yelled|called|"
                         r"answered|says|asks|added|laughed|giggled|barked)\b")


def casing_table(texts: list[str]) -> dict[str, str]:
    """For every word seen inside sentences of the cased `texts` with another spelling than all lower-case most
    often, that spelling: {"lily": "Lily", "i": "I", "tv": "TV"}."""
    spellings = defaultdict(Counter)
    for text in texts:
        for match in WORD.finditer(text):
            if not SENTENCE_INITIAL.search(text[max(0, match.start() - 4):match.start()]):
                spellings[match.group(0).lower()][match.group(0)] += 1
    return {word: best for word, counts in spellings.items() if (best := counts.most_common(1)[0][0]) != word}


def truecase(text: str, table: dict[str, str]) -> str:
    """Lower-cased text with its casing restored: each word spelled as `table` says, then the first letter of
    every sentence, line and quotation capitalized (not after a closing quote before a speech verb)."""
    text = WORD.sub(lambda match: table.get(match.group(0), match.group(0)), text)

    def capitalize(match: re.Match) -> str:
        before = match.group(1)
        if before[:1] in ".!?" and '"' in before and SPEECH_VERB.match(text, match.start(2)):
            return match.group(0)
        return before + match.group(2).upper()
    return SENTENCE_START.sub(capitalize, text)


# --- books --------------------------------------------------------------------------------------------------
CHAPTER = re.compile(r"chapter [ivxlc]+\b\.?", re.IGNORECASE)
SMALL_WORDS = {"a", "an", "and", "the", "of", "in", "on", "to", "for", "at", "by", "with", "or", "from"}


def book_paragraphs(raw: str, first_line: str, last_line: str | None) -> list[str]:
    """The body of a Project Gutenberg book as paragraphs with hard line wraps joined: from the last line equal
    to `first_line` (the first heading of the text; an earlier equal line is in the table of contents) to the
    line before `last_line` (None: the "*** END OF" marker). The header and license are outside; illustrations and
    _italics_ marks are dropped; quotes and dashes made ASCII (repair_text).

    Raises:
        ValueError when a marker line is not in the book.
    """
    lines = raw.replace("\ufeff", "").replace("\r\n", "\n").split("\n")
    stripped = [line.strip() for line in lines]
    end_marker = next((i for i, line in enumerate(stripped) if line.startswith("*** END OF")), len(lines))
    starts = [i for i, line in enumerate(stripped[:end_marker]) if line == first_line]
    ends = [i for i, line in enumerate(stripped[:end_marker]) if line == last_line and starts and i > starts[-1]]
    if not starts or (last_line and not ends):
        raise ValueError(f"the book has no line {first_line!r}, or no line {last_line!r} after it, before its "
                         "*** END OF marker")
    start, end = starts[-1], ends[0] if last_line else end_marker
    paragraphs = []
    for block in BLANK_LINES.split("\n".join(lines[start:end])):
        block_lines = [line.strip() for line in block.split("\n") if line.strip()]
        if block_lines and CHAPTER.fullmatch(block_lines[0]):  # "Chapter I" over its title: two paragraphs
            groups = [block_lines[:1], block_lines[1:]]
        else:
            groups = [block_lines]
        for group in groups:
            paragraph = re.sub(r"\[Illustration[^\]]*\]", "", " ".join(group))
            paragraph = repair_text(paragraph.replace("_", "").replace("--", " - ")).strip()
            if paragraph:
                paragraphs.append(paragraph)
    return paragraphs


def is_heading(paragraph: str) -> bool:
    """A chapter or tale heading: "Chapter IV", "CHAPTER I.", or a short line without lower-case letters."""
    return bool(CHAPTER.fullmatch(paragraph)) or (len(paragraph) <= 80 and not re.search(r"[a-z]", paragraph)
                                                  and bool(re.search(r"[A-Z]{2}", paragraph)))


def heading_case(heading: str) -> str:
    """An all-capitals heading in title case: "THE FROG-PRINCE" -> "The Frog-Prince", "CHAPTER IV" -> "Chapter IV",
    "THE STRAW, THE COAL, AND THE BEAN" -> "The Straw, the Coal, and the Bean"."""
    def word_case(index: int, word: str) -> str:
        if re.fullmatch(r"[IVXLC]+\.?", word) and index > 0:
            return word
        if index > 0 and word.lower() in SMALL_WORDS:
            return word.lower()
        return "-".join(part[:1] + part[1:].lower() for part in word.split("-"))
    return " ".join(word_case(index, word) for index, word in enumerate(heading.split(" ")))


def book_documents(paragraphs: list[str], max_chars: int = 1500) -> list[str]:
    """Consecutive paragraphs grouped into documents of at most `max_chars` characters (a longer paragraph is a
    document alone), paragraphs joined by a blank line; a heading starts a new document and is its first line,
    consecutive heading lines joined ("Chapter I. The Cyclone"), all-capitals headings in title case
    (heading_case)."""
    documents, current, heading = [], [], []

    def flush():
        if current:
            documents.append("\n\n".join(current))
            current.clear()
    for index, paragraph in enumerate(paragraphs):
        if is_heading(paragraph) or (index > 0 and CHAPTER.fullmatch(paragraphs[index - 1])):
            flush()
            heading.append(heading_case(paragraph) if paragraph.isupper() else paragraph)
            continue
        if heading:  # the chapter's first document opens with its heading
            current.append(". ".join(line.rstrip(".") for line in heading))
            heading.clear()
        elif current and len("\n\n".join(current + [paragraph])) > max_chars:
            flush()
        current.append(paragraph)
    flush()
    return documents


# --- SFT: what a story is about ------------------------------------------------------------------------------
# The subjects a request may name, singular; a plural (word + "s", or in PLURALS) counts for its singular.
# No places or sky ("park", "sun"): the first sentences name them as the scene, seldom as what the story is about.
SUBJECTS = ("cat dog bird fish rabbit bunny bear lion tiger frog duck mouse horse cow pig sheep monkey elephant "
            "owl fox squirrel puppy kitten butterfly bee bug ant turtle snake dinosaur dragon chicken whale "
            "girl boy princess prince king queen baby man woman robot "
            "ball car truck train boat plane kite doll toy tree flower balloon cake box book hat").split()
PLURALS = {"mice": "mouse", "puppies": "puppy", "butterflies": "butterfly", "bunnies": "bunny",
           "men": "man", "women": "woman", "babies": "baby", "boxes": "box", "fishes": "fish",
           "princesses": "princess"}
PEOPLE = {"girl", "boy", "princess", "prince", "king", "queen", "man", "woman", "baby"}
NAMED = re.compile(r"\b(?:a|an) (?:[a-z]+ ){0,2}?(girl|boy|princess|prince|king|queen|man|woman|cat|dog|bird|"
                   r"fish|rabbit|bunny|bear|frog|duck|mouse|puppy|kitten|robot|car|train|boat) "
                   r"(?:named|called) ([A-Z][a-z]+)")
REQUESTS = ("Write a short story about {}.", "Tell me a story about {}.", "Write a story about {}.",
            "Can you write a short story about {}?", "Please tell me a short story about {}.",
            "I would like a story about {}.")


def first_sentences(text: str, count: int = 2) -> str:
    """The first `count` sentences of a text (a sentence ends at . ! or ?, maybe followed by a closing quote)."""
    ends = [match.end() for match in re.finditer(r'[.!?]+["\']?(?=\s|$)', text)]
    return text[:ends[count - 1]] if len(ends) >= count else text


def subject_words(text: str) -> list[str]:
    """The words of SUBJECTS in a text, in order, plurals as their singular ("cats" -> "cat", "mice" -> "mouse")."""
    words = [PLURALS.get(word, word[:-1] if word.endswith("s") and word[:-1] in SUBJECTS else word)
             for word in re.findall(r"[a-z]+", text.lower())]
    return [word for word in words if word in SUBJECTS]


def story_subject(story: str) -> tuple[str, str | None] | None:
    """What a story is about: of the words of SUBJECTS in its first two sentences, the one the whole story
    uses most often (plurals counted), the earliest one on a tie, a word of PEOPLE only when no animal or thing
    is there (most stories open on "a little girl named Lily", a few on her cat); with the name given to it in
    those sentences ("a girl named Lily") when there is one. None when no subject word is there.

    Returns:
        (subject, name or None), e.g. ("cat", None) or ("girl", "Lily").
    """
    opening = first_sentences(story)
    candidates = subject_words(opening)
    if not candidates:
        return None
    counts = Counter(subject_words(story))
    subject = min(dict.fromkeys(candidates),
                  key=lambda word: (word in PEOPLE, -counts[word], candidates.index(word)))
    name = next((match.group(2) for match in NAMED.finditer(opening) if match.group(1) == subject), None)
    return subject, name


def opens_on_subject(story: str, subject: str) -> bool:
    """Whether the first sentence of `story` names `subject` (or its plural): "Once upon a time, there was a cat
    named Tom." opens on "cat"; a story whose cat first appears in its second sentence does not. A model fine-tuned
    on requests answered by such stories learns to copy the request's subject into its first sentence."""
    return subject in subject_words(first_sentences(story, count=1))


def story_request(subject: str, name: str | None, index: int) -> str:
    """The user's request for a story about `subject`, in the phrasing numbered `index` (cycling through
    REQUESTS): "Write a short story about a cat.", "Tell me a story about a girl named Lily.", ..."""
    article = "an" if subject[0] in "aeiou" else "a"
    about = f"{article} {subject}" + (f" named {name}" if name else "")
    return REQUESTS[index % len(REQUESTS)].format(about)
