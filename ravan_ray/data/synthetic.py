"""The synthetic 12-class text task (``data.name=synthetic``, the tests' dataset), generated from the seed."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ravan_ray.data.errors import DataError
from ravan_ray.data.text import TextClassificationData

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "nouns": ["match", "derby", "cup final", "tournament", "team", "coach", "striker", "referee",
                  "stadium", "marathon", "tennis match", "season opener", "goalkeeper", "playoff game"],
        "contexts": ["at the stadium", "in the second half", "during the playoffs", "on the pitch",
                     "after the penalty shootout", "in extra time", "at the training ground", "at the away game"],
        "activities": ["watched the derby", "played five-a-side football", "went to the basketball game",
                       "ran the city marathon", "followed the cup final", "trained with the squad",
                       "coached the youth team", "played a doubles tennis match"],
    },
    "finance": {
        "nouns": ["stock", "portfolio", "bank", "loan", "mortgage", "dividend", "investment fund", "budget",
                  "bond", "pension plan", "savings account", "tax return", "credit card", "earnings report"],
        "contexts": ["after the interest rate change", "on the trading floor", "this fiscal quarter",
                     "at the bank branch", "after the market closed", "in my brokerage account",
                     "during the earnings call", "before the tax deadline"],
        "activities": ["rebalanced my portfolio", "applied for a mortgage", "bought some index funds",
                       "filed my tax return", "met with a financial advisor", "opened a savings account",
                       "read the quarterly earnings report", "refinanced the car loan"],
    },
    "cooking": {
        "nouns": ["recipe", "soup", "pasta", "oven", "sauce", "bread", "dessert", "chef", "stew", "pastry",
                  "omelette", "curry", "roast chicken", "cookbook"],
        "contexts": ["in the kitchen", "after simmering for an hour", "with fresh garlic and basil",
                     "at the dinner party", "straight out of the oven", "at the cooking class",
                     "with homemade stock", "on the stove"],
        "activities": ["baked sourdough bread", "made a vegetable curry", "tried a new pasta recipe",
                       "cooked dinner for my family", "roasted a whole chicken", "took a cooking class",
                       "made soup from scratch", "baked a lemon tart"],
    },
    "travel": {
        "nouns": ["flight", "hotel", "train journey", "airport", "beach resort", "tour guide", "itinerary",
                  "cruise", "hostel", "road trip", "museum tour", "layover", "rental car", "boarding process"],
        "contexts": ["during the layover", "on our holiday", "at the check-in desk", "after landing",
                     "on the way to the coast", "in the old town", "at the border crossing",
                     "during our week abroad"],
        "activities": ["flew to Lisbon", "booked a hotel by the sea", "took the night train",
                       "went on a road trip", "visited the old town", "backpacked through the mountains",
                       "went on a cruise", "rented a car at the airport"],
    },
}
SENTIMENTS = ("positive", "negative", "neutral")

_POS = ["great", "excellent", "wonderful", "fantastic", "superb", "delightful", "impressive", "brilliant",
        "enjoyable", "outstanding", "amazing", "lovely"]
_NEG = ["terrible", "awful", "disappointing", "horrible", "dreadful", "frustrating", "poor", "miserable",
        "annoying", "disastrous", "unpleasant", "boring"]
_NEU = ["average", "ordinary", "okay", "unremarkable", "standard", "typical", "fairly routine",
        "about as expected"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "the weekend", "next week", "early june"]

# Predicates that follow a subject ("the flight ___" / "it ___"). Half of the positive and negative
# ones carry their sentiment through a negated word of the opposite polarity, and the neutral ones
# mix both polarities, so counting sentiment words does not give the label.
_PREDICATES = {
    "positive": ["was {pos}", "was really {pos}", "turned out {pos}", "was not {neg} at all",
                 "was never {neg}", "was anything but {neg}", "was not {neg} in the slightest"],
    "negative": ["was {neg}", "was really {neg}", "turned out {neg}", "was not {pos} at all",
                 "was never {pos}", "was anything but {pos}", "was far from {pos}"],
    "neutral": ["was {neu}", "was pretty {neu}", "was neither {pos} nor {neg}",
                "was not {pos} but not {neg} either", "had both {pos} and {neg} moments",
                "was {pos} in parts and {neg} in others", "is scheduled for {day}", "was moved to {day}"],
}
# Verb phrases that take the subject as object ("I ___ the flight").
_VERBS = {
    "positive": ["loved", "really enjoyed", "was thrilled with", "cannot complain about",
                 "was not disappointed by", "would happily recommend", "have nothing bad to say about"],
    "negative": ["hated", "did not enjoy", "was fed up with", "was not impressed by", "would never recommend",
                 "regret choosing", "have nothing good to say about"],
    "neutral": ["have no strong opinion about", "feel indifferent about", "have mixed feelings about",
                "want to ask a question about", "need more details on", "wrote down some notes about",
                "neither loved nor hated"],
}
_LEADS = ["", "", "", "honestly, ", "to be fair, ", "last weekend ", "yesterday ", "in my opinion, ",
          "for what it is worth, ", "as far as I can tell, ", "well, ", "so "]
_TRAILS = ["", "", "", " overall", " this time", " if you ask me", " to be honest", " as usual"]
# A clause that names another topic without judging it: a single off-topic keyword is a distractor,
# never the label.
_DISTRACTORS = [", even though my friend kept talking about the {x}", " while I was reading about the {x}",
                ", and later I checked on the {x}", " right after dealing with the {x}",
                " (unrelated, but the {x} comes up next week)", ", not that the {x} matters here"]


def _synthetic_sentence(rng: np.random.Generator, topic: str, sentiment: str) -> str:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    words = TOPICS[topic]
    subject = "the " + pick(words["nouns"])
    context = " " + pick(words["contexts"]) if rng.random() < 0.7 else ""
    frame = int(rng.integers(3))
    if frame == 0:
        body = f"{subject}{context} {pick(_PREDICATES[sentiment])}"
    elif frame == 1:
        body = f"I {pick(words['activities'])}{context} and it {pick(_PREDICATES[sentiment])}"
    else:
        body = f"I {pick(_VERBS[sentiment])} {subject}{context}"
    body = body.format(pos=pick(_POS), neg=pick(_NEG), neu=pick(_NEU), day=pick(_DAYS))
    distractor = ""
    if rng.random() < 0.35:
        other = pick([t for t in TOPICS if t != topic])
        distractor = pick(_DISTRACTORS).format(x=pick(TOPICS[other]["nouns"]))
    text = f"{pick(_LEADS)}{body}{pick(_TRAILS)}{distractor}."
    return text[0].upper() + text[1:]


def make_synthetic(train_size: int = 4000, test_size: int = 1000, seed: int = 0) -> TextClassificationData:
    """A 12-class text task generated from ``seed``: topic (sports, finance, cooking, travel) x
    sentiment (positive, negative, neutral); label ``t * 3 + s``, named ``"sports/positive"`` etc.

    Each sentence is one of three frames, ``<subject> [<context>] <predicate>``,
    ``I <activity> [<context>] and it <predicate>`` or ``I <verb> <subject> [<context>]``, with an
    optional lead ("honestly, ") and trail (" overall"). Subject, context and activity come from the
    topic's vocabulary; predicate and verb carry the sentiment, often through negation ("was not great
    at all" is negative, "was never boring" positive) or a mix of both polarities ("was great in parts
    and awful in others" is neutral). A third of the sentences add a clause naming a noun of another
    topic ("while I was reading about the mortgage"). So neither a single keyword nor a bag of
    sentiment words gives the label: the model must find the main clause's topic and the scope of
    the negation. Sentences are 8-30 words (under ~40 word pieces), classes are balanced, every text
    is unique across train and test, and the same seed gives the same data (numpy ``Generator``).
    """
    label_names = [f"{t}/{s}" for t in TOPICS for s in SENTIMENTS]
    num_classes = len(label_names)
    if train_size < num_classes or test_size < num_classes:
        raise DataError(
            f"synthetic data needs at least {num_classes} train and test rows (one per class), "
            f"got train_size={train_size}, test_size={test_size}"
        )
    rng = np.random.default_rng(seed)
    # Balanced labels in a seeded order, so every class is in both splits.
    labels = [rng.permutation(np.arange(n) % num_classes).astype(np.int64) for n in (train_size, test_size)]
    topics, seen, texts = list(TOPICS), set(), []
    for split_labels in labels:
        split_texts = []
        for label in split_labels:
            topic, sentiment = topics[label // len(SENTIMENTS)], SENTIMENTS[label % len(SENTIMENTS)]
            for _ in range(1000):
                text = _synthetic_sentence(rng, topic, sentiment)
                if text not in seen and 8 <= len(text.split()) <= 30:
                    break
            else:  # the vocabulary has ~10^6 sentences per class; reaching this means a huge size
                raise DataError(f"could not generate {train_size + test_size} distinct synthetic sentences")
            seen.add(text)
            split_texts.append(text)
        texts.append(split_texts)
    return TextClassificationData(texts[0], labels[0], texts[1], labels[1], label_names)
