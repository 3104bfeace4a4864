"""Local VQA accuracy (the VQA v2 evaluation metric) for splits whose answers are known.

The official evaluation server scores test-dev/test-std; this module scores e.g. a held-out
part of VQA val with the same metric, so that a run can be judged without the server:

- answers are normalised as the official evaluation does: whitespace, punctuation (removed or
  turned into spaces), periods not followed by a digit, number words to digits, articles
  dropped, missing apostrophes of contractions restored;
- a prediction's accuracy on a question with human answers h_1..h_n is the average, over the n
  leave-one-out subsets, of min(1, #matches in the subset / 3) (the "10 choose 9" form).
"""
import itertools
import re

# Punctuation that is deleted when it touches a space (or the text has a digit-comma-digit),
# and otherwise replaced by a space. The apostrophe is kept (contractions), the period is
# handled separately (decimal numbers).
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
               '@', '`', ',', '?', '!')
DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
# NOTE(faithful): the official pattern's look-behind is misspelt and never applies, so in effect
# a period is removed unless a digit follows it ("2.5" stays, "yes." -> "yes", "5." -> "5").
PERIOD = re.compile(r'\.(?!\d)')
NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
                'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')

_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll it's let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've
she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll
something's that's there'd there'd've there're there's they'd they'd've they'll they're they've
'twas wasn't we'd we'd've we're we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# Spellings that are ordinary words are not "restored" ("its", "well", "were", "shell", ...).
# First-person forms ("im", "ive", "id") are absent: the official table lists them capitalised,
# so after lower-casing they never match there either.
ORDINARY_WORDS = {'its', 'well', 'were', 'hell', 'shell', 'ill', 'id', 'wed', 'shed'}


def _contraction_table():
    """Every spelling of a contraction with one or more apostrophes missing -> the full form
    ("dont" -> "don't", "couldntve" and "couldn'tve" -> "couldn't've")."""
    table = {}
    for word in _CONTRACTED:
        pieces = word.split("'")
        for kept in itertools.product((True, False), repeat=len(pieces) - 1):
            spelled = pieces[0] + ''.join(("'" if keep else '') + piece
                                          for keep, piece in zip(kept, pieces[1:]))
            if not all(kept) and spelled not in ORDINARY_WORDS:
                table.setdefault(spelled, word)
    return table


CONTRACTIONS = _contraction_table()


def _strip_punctuation(text):
    # "1,000" keeps its digits together: then every mark is deleted, not spaced out.
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f'{mark} ' in text or f' {mark}' in text:
            out = out.replace(mark, '')
        else:
            out = out.replace(mark, ' ')
    return PERIOD.sub('', out)


def _digits_articles_contractions(text):
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return ' '.join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer):
    """The official VQA answer normalisation ("Two dogs." -> "2 dogs", "the cat" -> "cat",
    "dont know" -> "don't know", "left-side" -> "left side")."""
    answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
    return _digits_articles_contractions(_strip_punctuation(answer))


def answer_accuracy(prediction, human_answers):
    """VQA accuracy of one prediction in [0, 1] against the human answers of its question:
    the average over leave-one-out subsets of min(1, matches / 3). With a single human answer
    it is an exact match. Both sides are normalised.

    NOTE(fixed): the official script normalises only when the humans disagree; here both sides
    always are (identical when the stored answers are already normal, as in VQA v2).
    """
    if not human_answers:
        raise ValueError('a question needs at least one human answer to be scored')
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(answer) == prediction for answer in human_answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


def vqa_accuracy(results, annotations):
    """Mean VQA accuracy (in [0, 1]) of `results` ([{"question_id", "answer"}]) over the
    `annotations` ([{"question_id", "answer": [human answers]}]); every annotated question must
    have exactly one result. Ids are compared as given: int 1 and str '1' are two questions."""
    predicted = {}
    for result in results:
        if result['question_id'] in predicted:
            raise ValueError(f'question {result["question_id"]!r} is answered twice')
        predicted[result['question_id']] = result['answer']
    scores = []
    for ann in annotations:
        if ann['question_id'] not in predicted:
            raise ValueError(f'question {ann["question_id"]!r} has no predicted answer')
        humans = ann['answer'] if isinstance(ann['answer'], list) else [ann['answer']]
        scores.append(answer_accuracy(predicted[ann['question_id']], humans))
    if not scores:
        raise ValueError('no annotated questions to score')
    return sum(scores) / len(scores)
