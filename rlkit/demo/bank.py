"""Fact tables behind the demo's general (non-arithmetic) questions.

Every question here has one short, obviously-right answer sentence, so the *content* of a
chosen completion is never in doubt and the only thing the demo teaches is the answer
*format* (see `rlkit.demo.task`). The facts are deliberately easy: a 135M model should be
able to answer most of them already, which keeps the before/after comparison about format
rather than knowledge. All words are plain ASCII so the JSONL files stay byte-stable.

`general_items()` expands the tables into (question, answer sentence) pairs in a fixed
order; the generator shuffles them with its own seeded RNG.
"""

from __future__ import annotations

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Russia", "Moscow"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Ukraine", "Kyiv"), ("Czechia", "Prague"), ("Colombia", "Bogota"),
    ("Ghana", "Accra"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Scotland", "Edinburgh"),
    ("England", "London"), ("Switzerland", "Bern"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Venezuela", "Caracas"), ("Ethiopia", "Addis Ababa"),
    ("Iceland", "Reykjavik"),
)

OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("old", "new"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("wet", "dry"), ("rich", "poor"),
    ("strong", "weak"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"),
    ("heavy", "light"), ("near", "far"), ("push", "pull"), ("win", "lose"), ("buy", "sell"),
    ("enter", "exit"), ("begin", "end"), ("true", "false"), ("day", "night"), ("left", "right"),
    ("inside", "outside"), ("above", "below"), ("before", "after"), ("always", "never"),
    ("love", "hate"), ("friend", "enemy"), ("sweet", "sour"), ("brave", "afraid"),
    ("cheap", "expensive"), ("wide", "narrow"), ("deep", "shallow"), ("smooth", "rough"),
    ("awake", "asleep"), ("give", "take"), ("laugh", "cry"), ("arrive", "leave"),
    ("remember", "forget"), ("accept", "refuse"), ("north", "south"), ("east", "west"),
    ("question", "answer"),
)

PLURALS: tuple[tuple[str, str], ...] = (
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
    ("goose", "geese"), ("man", "men"), ("woman", "women"), ("person", "people"), ("ox", "oxen"),
    ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("leaf", "leaves"),
    ("knife", "knives"), ("wolf", "wolves"), ("half", "halves"), ("life", "lives"),
    ("box", "boxes"), ("bus", "buses"), ("church", "churches"), ("city", "cities"),
    ("baby", "babies"), ("story", "stories"), ("party", "parties"), ("toy", "toys"),
    ("day", "days"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("cactus", "cacti"), ("fungus", "fungi"), ("crisis", "crises"), ("glass", "glasses"),
    ("dish", "dishes"), ("watch", "watches"), ("fox", "foxes"), ("puppy", "puppies"),
    ("shelf", "shelves"), ("loaf", "loaves"), ("thief", "thieves"),
)

PAST_TENSES: tuple[tuple[str, str], ...] = (
    ("run", "ran"), ("eat", "ate"), ("go", "went"), ("see", "saw"), ("write", "wrote"),
    ("sing", "sang"), ("swim", "swam"), ("drink", "drank"), ("take", "took"), ("give", "gave"),
    ("buy", "bought"), ("think", "thought"), ("teach", "taught"), ("catch", "caught"),
    ("bring", "brought"), ("fly", "flew"), ("grow", "grew"), ("know", "knew"),
    ("throw", "threw"), ("draw", "drew"), ("break", "broke"), ("speak", "spoke"),
    ("choose", "chose"), ("freeze", "froze"), ("ride", "rode"), ("drive", "drove"),
    ("sleep", "slept"), ("keep", "kept"), ("feel", "felt"), ("leave", "left"),
    ("make", "made"), ("find", "found"), ("sit", "sat"), ("stand", "stood"),
    ("tell", "told"), ("sell", "sold"), ("win", "won"), ("begin", "began"),
    ("walk", "walked"), ("jump", "jumped"),
)

SYNONYMS: tuple[tuple[str, str], ...] = (
    ("big", "large"), ("small", "tiny"), ("happy", "glad"), ("sad", "unhappy"),
    ("fast", "quick"), ("smart", "clever"), ("begin", "start"), ("end", "finish"),
    ("angry", "mad"), ("pretty", "beautiful"), ("scared", "afraid"), ("tired", "sleepy"),
    ("rich", "wealthy"), ("easy", "simple"), ("hard", "difficult"), ("shout", "yell"),
    ("look", "see"), ("talk", "speak"), ("help", "assist"), ("buy", "purchase"),
    ("correct", "right"), ("error", "mistake"), ("gift", "present"), ("quiet", "silent"),
    ("funny", "amusing"), ("cold", "chilly"), ("old", "ancient"), ("strong", "powerful"),
    ("brave", "bold"), ("calm", "peaceful"),
)

SPANISH: tuple[tuple[str, str], ...] = (
    ("cat", "gato"), ("dog", "perro"), ("house", "casa"), ("water", "agua"), ("book", "libro"),
    ("red", "rojo"), ("green", "verde"), ("milk", "leche"), ("bread", "pan"), ("sun", "sol"),
    ("moon", "luna"), ("friend", "amigo"), ("school", "escuela"), ("car", "coche"),
    ("table", "mesa"), ("chair", "silla"), ("apple", "manzana"), ("door", "puerta"),
    ("window", "ventana"), ("flower", "flor"), ("tree", "arbol"), ("hello", "hola"),
    ("thank you", "gracias"), ("goodbye", "adios"), ("cheese", "queso"), ("horse", "caballo"),
    ("bird", "pajaro"), ("city", "ciudad"), ("sea", "mar"), ("love", "amor"),
)

ANIMAL_SOUNDS: tuple[tuple[str, str], ...] = (
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("frog", "croak"),
    ("rooster", "cock-a-doodle-doo"), ("snake", "hiss"), ("bee", "buzz"), ("mouse", "squeak"),
    ("goat", "bleat"), ("donkey", "hee-haw"), ("crow", "caw"), ("turkey", "gobble"),
    ("wolf", "howl"), ("pigeon", "coo"),
)

BABY_ANIMALS: tuple[tuple[str, str], ...] = (
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("horse", "foal"), ("sheep", "lamb"),
    ("goat", "kid"), ("pig", "piglet"), ("duck", "duckling"), ("frog", "tadpole"),
    ("kangaroo", "joey"), ("bear", "cub"), ("lion", "cub"), ("deer", "fawn"), ("goose", "gosling"),
    ("swan", "cygnet"), ("owl", "owlet"), ("hen", "chick"), ("eagle", "eaglet"),
)

ANIMAL_LEGS: tuple[tuple[str, str], ...] = (
    ("spider", "eight"), ("dog", "four"), ("chicken", "two"), ("ant", "six"), ("horse", "four"),
    ("beetle", "six"), ("duck", "two"), ("cat", "four"),
    ("butterfly", "six"), ("ostrich", "two"), ("crab", "ten"), ("scorpion", "eight"),
    ("kangaroo", "two"), ("elephant", "four"), ("snake", "no"),
)

COLOURS: tuple[tuple[str, str], ...] = (
    ("a banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"),
    ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"),
    ("a carrot", "orange"), ("a lemon", "yellow"), ("milk", "white"), ("a strawberry", "red"),
    ("a lime", "green"), ("chocolate", "brown"), ("a flamingo", "pink"), ("a crow", "black"),
    ("an eggplant", "purple"), ("a polar bear", "white"), ("a fire truck", "red"),
    ("a pumpkin", "orange"), ("a frog", "green"),
)

COLOUR_MIXES: tuple[tuple[str, str, str], ...] = (
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"), ("blue", "white", "light blue"),
)

SHAPE_SIDES: tuple[tuple[str, str], ...] = (
    ("triangle", "three"), ("square", "four"), ("rectangle", "four"), ("pentagon", "five"),
    ("hexagon", "six"), ("heptagon", "seven"), ("octagon", "eight"), ("decagon", "ten"),
)

UNIT_FACTS: tuple[tuple[str, str], ...] = (
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many days are in a leap year?", "There are 366 days in a leap year."),
    ("How many centimeters are in a meter?", "There are 100 centimeters in a meter."),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram."),
    ("How many meters are in a kilometer?", "There are 1000 meters in a kilometer."),
    ("How many years are in a century?", "There are 100 years in a century."),
    ("How many players are on a soccer team on the field?",
     "A soccer team has eleven players on the field."),
    ("How many continents are there?", "There are seven continents."),
)

OPEN_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Give me one tip for better sleep.", "For better sleep, go to bed at the same time every night."),
    ("Suggest a name for a pet goldfish.", "A fun name for a pet goldfish is Bubbles."),
    ("What is a good snack for a long hike?", "Trail mix is a good snack for a long hike."),
    ("Name a fruit that is rich in vitamin C.", "An orange is a fruit rich in vitamin C."),
    ("What should I pack for a beach day?", "For a beach day, pack sunscreen, water and a towel."),
    ("Give me a tip for learning a new language.",
     "Practice the new language for a few minutes every day."),
    ("What is a healthy breakfast idea?", "Oatmeal with fruit is a healthy breakfast idea."),
    ("Suggest a hobby I can do at home.", "Drawing is a relaxing hobby you can do at home."),
    ("How can I stay focused while studying?",
     "Put your phone away to stay focused while studying."),
    ("What is a good way to save money?", "A good way to save money is to cook at home."),
    ("Recommend a board game for a family night.", "Monopoly is a classic board game for family night."),
    ("What is one way to reduce stress?", "Taking a short walk outside can reduce stress."),
    ("Suggest a name for a friendly robot.", "A friendly robot could be named Sparky."),
    ("Give me a tip for writing a clear email.",
     "Put the main point of your email in the first sentence."),
    ("What is a good houseplant for beginners?", "A snake plant is a good houseplant for beginners."),
    ("How can I drink more water each day?", "Carry a water bottle with you all day."),
    ("What is a fun thing to do on a rainy day?", "On a rainy day, watching a movie is fun."),
    ("Suggest a topping for a pizza.", "Mushrooms are a tasty topping for a pizza."),
    ("What is a good exercise for beginners?", "Walking is a good exercise for beginners."),
    ("Give me a tip for keeping my desk tidy.", "Clear your desk at the end of each day."),
    ("What is a simple way to be kind today?", "A simple way to be kind is to thank someone."),
    ("Name a good book genre for a long trip.", "Mystery is a good book genre for a long trip."),
    ("How can I remember names better?", "Repeat a new name out loud to remember names better."),
    ("What is a good gift for a coffee lover?", "A bag of fresh beans is a good gift for a coffee lover."),
)

WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                             "Saturday", "Sunday")
MONTHS: tuple[str, ...] = ("January", "February", "March", "April", "May", "June", "July",
                           "August", "September", "October", "November", "December")

SPELLING_WORDS: tuple[str, ...] = (
    "garden", "window", "planet", "river", "castle", "pencil", "rabbit", "guitar", "orange",
    "winter", "summer", "bridge", "candle", "dragon", "forest", "jacket", "kitten", "ladder",
    "market", "needle", "pocket", "rocket", "silver", "tomato", "violin", "wizard", "yellow",
    "zebra", "anchor", "basket", "cookie", "desert", "engine", "falcon", "garlic", "hammer",
    "island", "jungle", "kettle", "lemon", "mirror", "napkin", "ocean", "parrot", "quilt",
    "ribbon", "saddle", "tunnel", "umbrella", "valley", "walnut", "button", "cactus", "donkey",
    "eagle", "feather", "giraffe", "harbor", "igloo", "jelly", "koala", "lizard", "meadow",
    "nest", "otter", "pepper", "rainbow", "spoon", "turtle", "unicorn", "volcano", "whale",
    "apple", "bread", "chair", "dance", "earth", "flame", "grape", "house", "juice", "knife",
    "light", "music", "night", "paper", "queen", "smile", "train", "voice", "water", "bottle",
    "cloud", "dream", "field", "glass", "heart", "mountain", "butter", "doctor", "friend",
    "monkey", "pirate", "puzzle", "shadow", "spider", "stream", "sugar", "thunder", "ticket",
    "tiger", "wallet", "banana", "carrot", "circle", "magnet", "marble", "muffin", "pillow",
)

_NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six",
                                  "seven", "eight", "nine", "ten", "eleven", "twelve")


def _a(noun: str) -> str:
    """`noun` with its indefinite article ("a dog", "an owl")."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _spelling_items() -> list[tuple[str, str]]:
    """First-letter and letter-count questions over the same word list."""
    items: list[tuple[str, str]] = []
    for w in SPELLING_WORDS:
        items.append((f"What is the first letter of the word '{w}'?",
                      f"The first letter of {w} is {w[0].upper()}."))
        n = _NUMBER_WORDS[len(w)] if len(w) < len(_NUMBER_WORDS) else str(len(w))
        items.append((f"How many letters are in the word '{w}'?", f"The word {w} has {n} letters."))
    return items


def _calendar_items() -> list[tuple[str, str]]:
    """Next/previous weekday and month questions."""
    items: list[tuple[str, str]] = []
    for names, unit in ((WEEKDAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(names):
            nxt, prev = names[(i + 1) % len(names)], names[i - 1]
            items.append((f"What {unit} comes after {name}?", f"The {unit} after {name} is {nxt}."))
            items.append((f"What {unit} comes before {name}?", f"The {unit} before {name} is {prev}."))
    return items


def general_items() -> list[tuple[str, str]]:
    """All general (question, answer sentence) pairs, in a fixed order, questions unique."""
    items: list[tuple[str, str]] = []
    items += [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in CAPITALS]
    items += [(f"What is the opposite of '{a}'?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES]
    items += [(f"What is the plural of '{a}'?", f"The plural of {a} is {b}.") for a, b in PLURALS]
    items += [(f"What is the past tense of '{a}'?", f"The past tense of {a} is {b}.")
              for a, b in PAST_TENSES]
    items += [(f"What is another word for '{a}'?", f"Another word for {a} is {b}.") for a, b in SYNONYMS]
    items += [(f"How do you say '{a}' in Spanish?", f"In Spanish, {a} is {b}.") for a, b in SPANISH]
    items += [(f"What sound does {_a(a)} make?", f"{_a(a).capitalize()} says {b}.") for a, b in ANIMAL_SOUNDS]
    items += [(f"What is a baby {a} called?", f"A baby {a} is called {_a(b)}.") for a, b in BABY_ANIMALS]
    items += [(f"How many legs does {_a(a)} have?", f"{_a(a).capitalize()} has {b} legs.")
              for a, b in ANIMAL_LEGS]
    items += [(f"What color is {a}?", f"{a[0].upper()}{a[1:]} is {b}.") for a, b in COLOURS]
    items += [(f"What color do you get by mixing {a} and {b}?", f"Mixing {a} and {b} makes {c}.")
              for a, b, c in COLOUR_MIXES]
    items += [(f"How many sides does {_a(a)} have?", f"{_a(a).capitalize()} has {b} sides.")
              for a, b in SHAPE_SIDES]
    items += list(UNIT_FACTS)
    items += list(OPEN_QUESTIONS)
    items += _calendar_items()
    items += _spelling_items()
    return items
