"""Word lists and sentence templates of the synthetic TL;DR task (`synthetic_tldr.py`).

A post's key facts are lexicon entries: who (a person, pet or company), what they did (an event), how
long (a duration) and what is asked. The gold reward finds facts by matching these entries, so the lists
obey two rules, checked by the tests: no entry contains another entry's words, and no distractor
sentence, filler or vague phrase contains any entry.
"""

from __future__ import annotations

# Each domain: subreddits, who, events (what `who` did, as a past-tense phrase), asks (after "should I").
DOMAINS = {
    "relationships": dict(
        subreddits=("relationships", "dating_advice", "relationship_advice"),
        who=("girlfriend", "boyfriend", "wife", "husband", "fiance", "crush"),
        events=(
            "read my texts",
            "forgot my birthday",
            "lied about money",
            "cancelled our vacation",
            "ignored my calls",
            "flirted at a party",
        ),
        asks=("break up", "try couples therapy", "talk about it", "forgive them", "take a break"),
    ),
    "work": dict(
        subreddits=("jobs", "careerguidance", "antiwork"),
        who=("boss", "manager", "coworker", "team lead", "recruiter", "client"),
        events=(
            "cut my hours",
            "took credit for my work",
            "yelled at me in a meeting",
            "denied my vacation",
            "skipped my review",
            "changed my schedule",
        ),
        asks=("quit", "ask for a raise", "go to hr", "look for a new job", "report it"),
    ),
    "money": dict(
        subreddits=("personalfinance", "povertyfinance", "Frugal"),
        who=("bank", "car dealer", "insurance company", "accountant", "payday lender", "credit union"),
        events=(
            "charged me twice",
            "closed my account",
            "raised my interest rate",
            "lost my paperwork",
            "denied my loan",
            "sent me to collections",
        ),
        asks=("dispute the charge", "file a complaint", "pay it off", "get a lawyer", "cancel the card"),
    ),
    "housing": dict(
        subreddits=("landlord", "roommates", "HomeImprovement"),
        who=("landlord", "roommate", "neighbor", "superintendent", "contractor", "upstairs tenant"),
        events=(
            "raised the rent",
            "kept my deposit",
            "ate my food",
            "threw a loud party",
            "broke the sink",
            "entered without notice",
        ),
        asks=("move out", "call the city", "withhold rent", "leave a note", "talk to them"),
    ),
    "family": dict(
        subreddits=("Parenting", "raisedbynarcissists", "JUSTNOMIL"),
        who=("mom", "dad", "sister", "brother", "mother in law", "stepdad", "grandma"),
        events=(
            "read my diary",
            "skipped my graduation",
            "borrowed my car",
            "insulted my cooking",
            "invited my ex",
            "spent my savings",
        ),
        asks=("cut contact", "set boundaries", "move back home", "confront them", "skip the holidays"),
    ),
    "pets": dict(
        subreddits=("dogs", "cats", "Pets"),
        who=("dog", "cat", "puppy", "kitten", "parrot", "rabbit"),
        events=(
            "chewed my shoes",
            "stopped eating",
            "bit my nephew",
            "ran away",
            "scratched the couch",
            "got sick",
        ),
        asks=("see a vet", "rehome it", "try obedience classes", "change the food", "get a second pet"),
    ),
    "school": dict(
        subreddits=("college", "GradSchool", "teachers"),
        who=("professor", "advisor", "lab partner", "classmate", "tutor", "dean"),
        events=(
            "failed my paper",
            "copied my homework",
            "missed our deadline",
            "lost my thesis draft",
            "reported me for cheating",
            "changed the grading",
        ),
        asks=(
            "drop the class",
            "appeal the grade",
            "switch programs",
            "retake the exam",
            "email the department",
        ),
    ),
    "health": dict(
        subreddits=("fitness", "loseit", "Anxiety"),
        who=("trainer", "doctor", "gym buddy", "therapist", "dietitian", "coach"),
        events=(
            "mocked my progress",
            "cancelled my sessions",
            "ignored my injury",
            "changed my meal plan",
            "posted my photos",
            "doubled my workouts",
        ),
        asks=(
            "find someone new",
            "stop going",
            "get a second opinion",
            "take a rest week",
            "lower my calories",
        ),
    ),
    "tech": dict(
        subreddits=("techsupport", "buildapc", "gaming"),
        who=("internet provider", "repair shop", "teammate", "guild leader", "seller", "cousin"),
        events=(
            "wiped my hard drive",
            "sold me a broken gpu",
            "banned my account",
            "throttled my connection",
            "deleted my save file",
            "kept my laptop",
        ),
        asks=("ask for a refund", "buy a new one", "reinstall windows", "leave the guild", "report them"),
    ),
}
# Subreddits any domain may be posted to.
GENERAL_SUBREDDITS = ("AskReddit", "tifu", "AmItheAsshole", "offmychest", "TrueOffMyChest")
DURATIONS = (
    "two weeks",
    "three weeks",
    "a month",
    "two months",
    "three months",
    "six months",
    "eight months",
    "a year",
    "two years",
    "three years",
    "four years",
    "five years",
    "ten years",
)

# Post sentences; {who}, {event}, {duration}, {ask} are filled with the post's facts.
INTRO = (
    "I have known my {who} for {duration}.",
    "My {who} and I go back {duration}.",
    "For {duration} everything was fine with my {who}.",
    "I have been dealing with my {who} for {duration} now.",
)
EVENT = (
    "Last week my {who} {event}.",
    "Yesterday my {who} {event} without telling me.",
    "Then out of nowhere my {who} {event}.",
    "A few days ago my {who} {event} and acted like it was nothing.",
    "This weekend my {who} {event}, and I am still upset.",
)
ASK = (
    "Should I {ask}?",
    "Do I {ask} or just wait?",
    "I am thinking I should {ask}, thoughts?",
    "Would it be crazy to {ask}?",
    "Part of me wants to {ask}. Is that reasonable?",
)
TITLE = (
    "My {who} {event}",
    "Need advice: my {who} {event}",
    "Me [{age}{sex}] and my {who}, not sure what to do",
    "Is it wrong to {ask}?",
    "My {who} {event}, what now?",
)
DISTRACTORS = (
    "Sorry for the formatting, I am on mobile.",
    "Throwaway account for obvious reasons.",
    "English is not my first language.",
    "Some background first.",
    "I do not usually post here.",
    "It has been a long week.",
    "I made pasta last night and could not stop thinking about it.",
    "Anyway, that is not really the point.",
    "Edit: thanks for all the replies so far.",
    "I am not sure this is the right place to ask.",
    "The weather here has been awful lately.",
    "I tried to sleep on it but that did not help.",
    "Part of me thinks I am overreacting.",
    "My phone is about to die so I will be quick.",
    "I live in a small town so everyone knows everyone.",
    "I already asked a few people in real life.",
    "Please be nice, this is hard to write.",
    "I have read similar posts here but mine feels different.",
    "Long time lurker, first time poster.",
    "It is probably not a big deal to most people.",
)

# Reference-summary pieces.
VAGUE_WHO = ("someone close to me", "this person", "they")
VAGUE_EVENT = ("did something shady", "hurt me", "messed up", "crossed a line")
NO_ASK = ("what do I do?", "help.", "advice?", "not sure what to do.")
ASK_SUMMARY = ("should I {ask}?", "do I {ask}?", "thinking I should {ask}.", "wondering if I should {ask}.")
FILLER = (
    "and honestly I keep thinking about it all day",
    "and I do not know how to feel about any of this",
    "which is really stressing me out lately",
    "and everyone I ask says something different",
)
