"""TinyTales: the kit's built-in offline corpus of simple English children's stories.

Every story is generated from the word lists and sentence patterns in this file, so the quickstart can
train a small GPT on a machine with no network. The language is deliberately narrow (about a thousand
distinct words, one tense, a handful of plot arcs) so that a 4-layer model learns its structure in minutes
on a CPU, yet varied enough (characters, places, objects, arcs, phrasings) that it cannot simply memorize.

Stories are deterministic: story i of a seed depends only on (seed, i), through random.Random seeded with
a string, which Python hashes with SHA-512 and so gives the same stream on every machine and version.

    python tinytales.py --num 2 --seed 7
"""
import argparse
import itertools
import random
from dataclasses import dataclass
from typing import Iterator

# GPT-2's BPE averages 3.9 characters per token on this text (measured over 5,000 stories); counting characters
# is much cheaper than tokenizing, and tests/test_tinytales.py checks the estimate against the real tokenizer.
CHARS_PER_TOKEN = 3.9


# ---------------------------------------------------------------- word lists

@dataclass(frozen=True)
class Kind:
    noun: str  # "fox", "little robot"
    pronoun: str  # "he", "she", "it", or "" for either, chosen per character
    home: str  # completes "lived ..."
    moves: str  # past-tense way of going somewhere
    skill: str  # how it helps in a search, completes "Max ..."


KINDS = (
    Kind("girl", "she", "in a little house with a red door", "ran", "looked under every bush and stone"),
    Kind("boy", "he", "in a small house with a blue door", "ran", "looked under every bush and stone"),
    Kind("fox", "", "in a den under a big rock", "trotted", "sniffed along the ground"),
    Kind("bunny", "", "in a cozy burrow", "hopped", "listened with long ears"),
    Kind("bear cub", "", "in a warm cave", "walked", "looked under every big rock"),
    Kind("little duck", "", "in a nest by the water", "waddled", "looked behind every reed and stone"),
    Kind("kitten", "", "in a basket by the fire", "ran", "crept softly through the grass"),
    Kind("puppy", "", "in a little dog house", "ran", "sniffed here and there"),
    Kind("mouse", "", "in a tiny hole in the wall", "scurried", "squeezed into all the tiny places"),
    Kind("squirrel", "", "in a hole in an oak tree", "scampered", "climbed up high to look around"),
    Kind("frog", "", "by a quiet pond", "hopped", "jumped from place to place"),
    Kind("owl", "", "in a hollow tree", "flew", "flew up high to look around"),
    Kind("hedgehog", "", "under a pile of leaves", "walked", "poked through the leaves"),
    Kind("little elephant", "", "near a big watering hole", "walked", "lifted the branches with a long trunk"),
    Kind("turtle", "", "by the river", "walked", "looked slowly and carefully"),
    Kind("lion cub", "", "in the tall grass", "ran", "looked around with sharp eyes"),
    Kind("pig", "", "on a busy farm", "trotted", "dug here and there with a pink nose"),
    Kind("little dragon", "", "in a cave on a mountain", "flew", "flew over the trees to look"),
    Kind("penguin", "", "in an igloo by the sea", "waddled", "slid along on its belly to look"),
    Kind("lamb", "", "in a green field", "skipped", "looked in every corner"),
    Kind("deer", "", "in the deep woods", "leaped", "looked around with big dark eyes"),
    Kind("badger", "", "in a tunnel under the hill", "walked", "dug with strong paws"),
    Kind("giraffe", "", "on the wide plain", "walked", "looked over the tops of the bushes"),
    Kind("monkey", "", "in a tall tree", "swung", "swung from branch to branch to look"),
    Kind("little robot", "it", "in a workshop full of tools", "rolled", "beeped and scanned the ground"),
)

NAMES = {
    "she": ("Lily", "Mia", "Emma", "Zoe", "Ella", "Ruby", "Rosie", "Lucy", "Maya", "Nora", "Ivy", "Daisy",
            "Hazel", "Anna", "Sara", "Molly", "Poppy", "Luna", "Clara", "Grace", "Ava", "Amy", "Bella", "Tess",
            "Nina", "Jade", "Kate", "Alice", "Olive", "Penny", "Sophie", "Millie"),
    "he": ("Tom", "Max", "Sam", "Ben", "Leo", "Jack", "Finn", "Oliver", "Noah", "Theo", "Eli", "Owen", "Milo",
           "Jake", "Toby", "Ollie", "Luke", "Hugo", "Dan", "Oscar", "Felix", "Jamie", "Alex", "Ned", "Pete",
           "Ray", "Tim", "Ravi", "Omar", "Kai", "Liam", "Ethan"),
    "it": ("Bolt", "Beep", "Pip", "Zip", "Gizmo", "Sprocket", "Tinker", "Widget", "Clank", "Dot", "Bleep",
           "Rusty"),
}

# (subject, object, possessive, reflexive); "her" is both object and possessive, so they are looked up by role.
PRONOUNS = {
    "he": ("he", "him", "his", "himself"),
    "she": ("she", "her", "her", "herself"),
    "it": ("it", "it", "its", "itself"),
}

# trait -> what a character with it habitually did, completes "Lily ..."
TRAITS = {
    "curious": "always wanted to know how things worked",
    "kind": "always helped others",
    "shy": "spoke in a small, soft voice",
    "brave": "was not afraid of much",
    "cheerful": "smiled all day long",
    "clever": "was good at solving puzzles",
    "playful": "enjoyed games of every kind",
    "gentle": "was careful with every living thing",
    "happy": "hummed little songs all day",
    "busy": "was always doing something",
    "friendly": "said hello to everyone",
    "careful": "always looked before jumping",
    "silly": "made everyone laugh",
    "sleepy": "took long naps in the sun",
    "quiet": "liked calm and peaceful places",
    "helpful": "was always ready to lend a hand",
    "grumpy": "often frowned, but had a warm heart",
    "eager": "always wanted to try new things",
    "adventurous": "was always exploring",
    "lively": "never sat still for long",
    "polite": "always said please and thank you",
    "thoughtful": "always thought of others",
    "funny": "told the best jokes",
}

HOBBIES = ("play outside", "sing songs", "draw pictures", "run and jump", "look at the clouds",
           "splash in puddles", "count the stars", "build things", "dance in the sun", "listen to stories",
           "pick flowers", "play hide and seek", "collect shiny stones", "watch the birds", "make up new games",
           "climb trees", "bake cookies", "play in the sand", "ride a bike", "paint with bright colors",
           "tell jokes", "fly kites", "blow bubbles", "play the drum", "go on long walks", "look for bugs")

ELDERS = ("Grandma", "Grandpa", "Mom", "Dad", "Aunt Rose", "Uncle Joe", "Miss Hill", "Old Owl")

# place -> spots in it where something can hide or be lost
PLACES = {
    "the park": ("under a bench", "behind the big oak tree", "near the swings", "in the tall grass",
                 "by the fountain"),
    "the forest": ("under a pile of leaves", "behind a mossy log", "next to a big mushroom",
                   "inside a hollow log", "under a fern"),
    "the garden": ("under the roses", "behind the watering can", "between the carrots", "near the bird bath",
                   "under a big cabbage leaf"),
    "the meadow": ("among the daisies", "in the tall grass", "under a flat rock", "near the little stream",
                   "behind a bush"),
    "the farm": ("in the barn", "behind the hay", "next to the pig pen", "under the old cart",
                 "by the chicken coop"),
    "the pond": ("among the reeds", "under a lily pad", "behind a wet rock", "on the little bridge",
                 "near the ducks"),
    "the hill": ("behind a big rock", "under a bush", "at the bottom of the slope", "near the old windmill",
                 "in a patch of clover"),
    "the orchard": ("under an apple tree", "behind a basket of pears", "in the long grass", "next to the ladder",
                    "under the fallen leaves"),
    "the playground": ("under the slide", "in the sandbox", "behind the seesaw", "near the swings",
                       "under the climbing frame"),
    "the river": ("behind a big stone", "in the mud by the water", "under the wooden bridge", "among the reeds",
                  "near the stepping stones"),
    "the beach": ("under a pile of seaweed", "behind a sand castle", "near the rock pools", "under a towel",
                  "next to a big shell"),
    "the village": ("behind the bakery", "near the old well", "under the market cart", "by the town clock",
                    "next to the flower shop"),
}

WHEN = ("One day", "One sunny morning", "One afternoon", "Early one morning", "One bright day",
        "One warm afternoon", "One day in spring", "One summer day", "One windy afternoon", "One fine morning",
        "One cloudy day", "After breakfast one day", "One Saturday morning")

COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "brown", "golden", "striped",
          "spotted", "shiny", "little", "old")
TOYS = ("ball", "hat", "scarf", "kite", "toy car", "bucket", "ribbon", "blanket", "cup", "bell", "whistle",
        "drum", "teddy bear", "marble", "toy boat", "wagon", "doll", "spinning top", "jump rope", "puppet",
        "flute", "paintbrush", "storybook")

# The rest are per-arc tables; "{name}", "{he}", "{his}", ... are the hero's, filled by fill().

# (what it is, short name, where it is, how they enjoy it together)
OUT_OF_REACH = (
    ("a big red apple", "apple", "high up in a tree",
     "{name} broke the apple in two and gave half to {friend}. It was the sweetest apple they had ever tasted."),
    ("a ripe yellow pear", "pear", "on the top branch of a tall tree",
     "{name} cut the pear in two, and the two friends ate it together. It was juicy and sweet."),
    ("a blue kite", "kite", "caught in the branches of a tall tree",
     "They took turns flying the kite until the sun went down."),
    ("a bright red ball", "ball", "stuck on the roof of the old shed",
     "They played catch with the ball all afternoon."),
    ("a straw hat", "hat", "caught on a high branch after the wind blew it away",
     "{name} put on the hat, and {friend} laughed and said it looked very fine."),
    ("a bunch of sweet cherries", "cherries", "hanging from a high branch",
     "They shared the cherries, one for {name} and one for {friend}, until they were all gone."),
)

# (how to get it down, said by the friend; what happened)
PLANS = (
    ("I have an idea! Let's find a long stick.",
     "{friend} found a long stick. Together they reached up and pushed and pushed. Down came the {thing}!"),
    ("Climb on my back, and you can reach it.",
     "{name} climbed onto {friend}'s back and stretched up high. {He} grabbed the {thing}!"),
    ("If we shake the tree together, it will fall.",
     "They held the trunk and shook it with all their might. Down came the {thing}!"),
)

# (what it is, a trigger, a reaction, what the hero said to the elder, advice, the brave try, the success)
FEARS = (
    ("the dark",
     "One night, the wind made the trees creak, and dark shadows moved on the wall.",
     "{name} hid under {his} blanket and did not move.",
     "I am scared of the dark.",
     "The dark is just the night, resting. Everything around you is still here, the same as in the day.",
     "Together they looked up at the moon and the stars.",
     "{name} was not scared anymore. Soon {he} was fast asleep."),
    ("thunder",
     "One afternoon, big gray clouds filled the sky, and the thunder went boom!",
     "{name} ran inside and hid under the table.",
     "The thunder is too loud. I am scared.",
     "Thunder is just the sky playing a big drum. It cannot hurt you when you are inside.",
     "They sat close together and counted the seconds between each flash and each boom.",
     "Soon the storm moved far away, and {name} laughed at the little rumbles."),
    ("deep water",
     "One hot day, all of {his} friends were splashing in the pond.",
     "{name} stood at the edge and did not go in.",
     "The water is too deep. I am scared.",
     "Start where the water is low. Take one small step at a time.",
     "{name} put one foot in the water. Then {he} put in the other foot. The water was cool and nice.",
     "Soon {he} was splashing and kicking with {his} friends."),
    ("the big slide",
     "At the playground, there was a very tall slide.",
     "{name} climbed halfway up the ladder, and then {he} climbed back down.",
     "The slide is too high. I am scared.",
     "I will be right here at the bottom. You can do it.",
     "{name} climbed all the way to the top, took a deep breath, and let go.",
     "Down {he} went, faster and faster, and {he} landed at the bottom with a laugh."),
    ("the big dog next door",
     "Every time {name} walked past the gate, the big dog next door barked loudly.",
     "{name} ran the other way as fast as {he} could.",
     "The big dog is scary. I am scared of him.",
     "He barks because he wants to say hello. Let's meet him together.",
     "{name} held out {his} hand slowly. The dog sniffed it and wagged his tail.",
     "The big dog was not scary at all. He just wanted a friend."),
    ("the first day of school",
     "It was {his} first day at school, and the room was full of faces {he} did not know.",
     "{name} held on tight at the door and did not want to go in.",
     "I do not know anyone. I am scared.",
     "Everyone feels a little scared on the first day. Just say hello to one friend.",
     "{name} walked in and said hello to the first friendly face {he} saw.",
     "By lunchtime, {he} had a new friend, and school did not seem scary at all."),
    ("bees",
     "In the garden, a big fuzzy bee buzzed around the flowers.",
     "{name} screamed and ran away.",
     "The bee will sting me. I am scared.",
     "Bees are busy making honey. If you stay calm and still, they will leave you alone.",
     "{name} stood very still and watched. The bee landed on a flower, drank a little, and flew away.",
     "{name} smiled. The bee was just doing its job, like everyone else."),
)

# (goal, what went wrong, advice, second try, success)
PROJECTS = (
    ("build a tall tower of blocks",
     "But when {he} put the last block on top, the whole tower fell down with a crash!",
     "Put the big blocks at the bottom and the small blocks at the top.",
     "This time, {name} put the big blocks at the bottom and the small ones on top.",
     "The tower stood tall and strong."),
    ("make a sand castle",
     "But the sand was too dry, and the castle fell apart.",
     "Add a little water to the sand. Wet sand sticks together.",
     "This time, {name} mixed a little water into the sand and pressed it down hard.",
     "The castle stood up straight, with four towers and a little wall."),
    ("bake a cake",
     "But {he} forgot the sugar, and the cake tasted funny.",
     "Read the recipe one step at a time, and do not rush.",
     "This time, {name} read each step slowly and did not forget anything.",
     "The cake was soft and sweet, and the whole house smelled good."),
    ("make a paper boat",
     "But when {he} put it in the water, it filled up and sank.",
     "Fold the sides up high, so the water stays out.",
     "This time, {name} folded the sides up high and pressed each fold flat.",
     "The little boat floated all the way across the puddle."),
    ("build a bird house",
     "But the roof was crooked, and it fell off.",
     "Measure each piece twice, and use two nails, not one.",
     "This time, {name} measured each piece twice and used two nails.",
     "The bird house was strong, and soon a little bird came to live in it."),
    ("fly a kite",
     "But the kite just went bump on the ground.",
     "Run into the wind and let the string out slowly.",
     "This time, {name} ran into the wind and let the string out slowly.",
     "The kite went up, up, up into the blue sky."),
    ("ride a bike",
     "But every time {he} tried, {he} wobbled and fell over.",
     "Look ahead, not down at your feet, and keep pushing the pedals.",
     "This time, {name} looked far ahead and kept pushing the pedals.",
     "The bike rolled smoothly down the path."),
    ("plant a garden",
     "But {he} forgot to water the seeds, and nothing grew.",
     "Seeds need water and sun every day. Be patient.",
     "This time, {name} watered the seeds every morning and waited.",
     "Soon little green shoots came up, and then bright flowers opened."),
    ("paint a picture of the sea",
     "But the colors ran together into a muddy brown mess.",
     "Let each color dry before you add the next one.",
     "This time, {name} painted the sky first and let it dry before {he} painted the sea.",
     "The picture was bright and beautiful, and {name} hung it on the wall for everyone to see."),
    ("learn to whistle",
     "But every time {he} tried, only air came out.",
     "Make your lips small and round, and blow very gently.",
     "This time, {name} made {his} lips small and round and blew very gently.",
     "A clear little whistle came out, like a bird singing."),
)

# (what both wanted, how they shared it in the end)
SHARED_THINGS = (
    ("the red swing", "{friend} pushed {name} on the swing, and then {name} pushed {friend}."),
    ("the last cookie", "They broke the cookie in half, and each half tasted even better."),
    ("a big box of crayons", "They drew a big picture together, with a sun, a house, and a rainbow."),
    ("a shiny new ball", "They rolled the ball back and forth and laughed and laughed."),
    ("a toy drum", "One played the drum while the other danced, and then they switched."),
    ("the best spot in the sandbox", "They built one big sand castle together, right in the middle."),
    ("the big red wagon", "First {name} pulled {friend} in the wagon, and then {friend} pulled {name}."),
)

# (who is in trouble, what the trouble is, how they helped, how it ended)
CREATURES = (
    ("a little bird", "that had fallen out of its nest",
     "{name} gently picked up the bird, and {friend} helped {him} put it back in its nest.",
     "The mother bird sang a happy song to say thank you."),
    ("a small kitten", "that was stuck high up in a tree",
     "{friend} held the branch steady while {name} helped the kitten climb down.",
     "The kitten purred and rubbed against {name}'s legs."),
    ("a baby duck", "that could not find its mother",
     "They walked along the water, calling and calling, until they heard a loud quack. There was the mother duck!",
     "The baby duck swam to its mother, and they both quacked a happy thank you."),
    ("a tiny turtle", "that was stuck on its back and could not turn over",
     "{name} carefully turned the turtle over, and {friend} helped it to the water.",
     "The turtle smiled a slow smile and swam away."),
    ("a lost puppy", "that was shaking and crying",
     "They read the tag on its collar, which said it lived in the yellow house. Together they took it home.",
     "The puppy's family was so happy that they gave {name} and {friend} a big bag of cookies."),
    ("a little mouse", "that was caught in a sticky net",
     "{name} held the net still, and {friend} carefully pulled the threads apart.",
     "The little mouse squeaked thank you and ran back to its family."),
    ("a baby bunny", "that had hurt its paw",
     "{name} wrapped the paw in a soft leaf, and {friend} carried the bunny home to its burrow.",
     "The bunny's mother hugged them both and gave them each a carrot."),
    ("a small fish", "that was stuck in a puddle far from the water",
     "{name} and {friend} scooped up the fish in their hands and carried it back to the river.",
     "The fish flipped its tail and splashed them, as if to say thank you."),
)

# (where the hero longed to go, what they saw there)
DESTINATIONS = (
    ("the top of the tall hill", "They could see the whole village, as tiny as toys."),
    ("the big waterfall", "The water fell down with a roar, and a rainbow danced in the spray."),
    ("the flower field beyond the woods", "There were flowers of every color, as far as they could see."),
    ("the end of the river", "The river opened into the wide blue sea, and the waves sparkled in the sun."),
    ("the old lighthouse", "They climbed the steps and watched the boats sail home."),
    ("the sunflower farm", "The sunflowers were taller than the trees, and they all turned to face the sun."),
    ("the old castle on the hill", "They ran through the old halls and looked out from the highest tower."),
    ("the little beach beyond the cliffs", "The sand was white and soft, and they found shells of every shape."),
)

# (what was in the way, how they got past it)
OBSTACLES = (
    ("a wide stream", "They jumped across it from stone to stone."),
    ("a dark part of the woods", "They held hands and sang a song to feel brave."),
    ("a steep path", "They helped each other up, one step at a time."),
    ("a big muddy puddle", "They found a fallen log and walked across it carefully."),
    ("a field of prickly bushes", "They found a narrow path and walked through it in a line."),
    ("a tall fence", "They walked along it until they found a little gate."),
)

# (the game, one sentence of playing it)
GAMES = (
    ("tag", "They ran and ran, and nobody could catch {friend}, who was very fast."),
    ("hide and seek", "{friend} hid {spot}, and {name} looked everywhere before finding {friend}."),
    ("catch", "They threw a ball back and forth, higher and higher."),
    ("follow the leader", "They took turns being the leader, hopping, skipping, and spinning around."),
    ("jump rope", "They took turns jumping, and they counted all the way to fifty."),
    ("pirates", "They pretended to be pirates sailing across a big blue sea to find treasure."),
)

# (the present, what went wrong, how they fixed it)
GIFTS = (
    ("a bunch of flowers", "But on the way home, {name} tripped, and the flowers were squashed.",
     "So they went back and picked new flowers, the brightest ones they could find."),
    ("a big drawing", "But the rain splashed on the paper, and the colors ran.",
     "So they drew a new picture together, even bigger and brighter than before."),
    ("a plate of cookies", "But the cookies came out of the oven too dark.",
     "So they made a new batch, and this time they watched the oven very closely."),
    ("a necklace of shells", "But the string broke, and the shells rolled all over the floor.",
     "So they picked up every shell and put them on a new, stronger string."),
    ("a little wooden box", "But the lid would not close, no matter how hard {he} pushed.",
     "So they sanded the edges until the lid closed with a soft click."),
)


# ---------------------------------------------------------------- characters and sentences

def a(phrase: str) -> str:
    """'a fox', 'an owl'. The word lists avoid the exceptions (an hour, a unicorn), so the first letter decides."""
    return ("an " if phrase[0] in "aeiouAEIOU" else "a ") + phrase


def say(rng: random.Random, who: str, line: str, verb: str = "said", more: str = "") -> str:
    """A quote with its speaker, before or after, so both common word orders are learned.

    A statement's full stop becomes a comma inside the quotes when the speaker follows it.
    """
    if rng.random() < 0.5:  # 'Max said, "..."'; the speaker may be "the fox", so capitalize it
        words = f"{line} {more}" if more else line
        return f'{who[0].upper()}{who[1:]} {verb}, "{words}"'
    head = line[:-1] + "," if line.endswith(".") else line
    tail = f' "{more}"' if more else ""
    return f'"{head}" {verb} {who}.{tail}'


@dataclass(frozen=True)
class Character:
    name: str
    kind: Kind
    pronoun: str
    trait: str

    @property
    def he(self) -> str:
        return PRONOUNS[self.pronoun][0]

    @property
    def him(self) -> str:
        return PRONOUNS[self.pronoun][1]

    @property
    def his(self) -> str:
        return PRONOUNS[self.pronoun][2]

    @property
    def himself(self) -> str:
        return PRONOUNS[self.pronoun][3]

    @property
    def He(self) -> str:
        return self.he.capitalize()

    @property
    def His(self) -> str:
        return self.his.capitalize()

    @property
    def human(self) -> bool:
        return self.kind.noun in ("girl", "boy")


def make_character(rng: random.Random, avoid: str = "") -> Character:
    kind = rng.choice(KINDS)
    pronoun = kind.pronoun or rng.choice(("he", "she"))
    name = rng.choice(tuple(n for n in NAMES[pronoun] if n != avoid))
    return Character(name, kind, pronoun, rng.choice(tuple(TRAITS)))


def introduce(rng: random.Random, c: Character, owner: Character) -> str:
    """First mention of a side character: 'a boy named Sam', 'her friend Max the fox'."""
    title = c.name if c.human else f"{c.name} the {c.kind.noun}"
    if rng.random() < 0.5:
        return f"{owner.his} friend {title}"
    return f"{a(c.kind.noun)} named {c.name}" if c.human else title


def fill(template: str, hero: Character, friend: Character, **extra: str) -> str:
    """Fills a table sentence: {name}/{he}/{him}/{his}/{He} are the hero's, {friend} is the friend's name."""
    return template.format(name=hero.name, he=hero.he, him=hero.him, his=hero.his, He=hero.He,
                           friend=friend.name, **extra)


def para(*sentences: str) -> str:
    return " ".join(s for s in sentences if s)


def maybe(rng: random.Random, sentence: str, p: float = 0.5) -> str:
    """Sometimes a sentence, sometimes not: varies story length and rhythm."""
    return sentence if rng.random() < p else ""


# ---------------------------------------------------------------- the story parts
# An arc takes (rng, hero, friend, elder's name, place) and returns the paragraphs after the opening.

def arrival(rng: random.Random, f: Character, h: Character) -> str:
    """The friend walks into the story."""
    who = introduce(rng, f, h)
    return rng.choice((f"Just then, {who} came by.", f"Soon, {who} {f.kind.moves} over.",
                       f"A moment later, {who} came along."))


def opening(rng: random.Random, h: Character) -> str:
    habit, hobby = TRAITS[h.trait], rng.choice(HOBBIES)
    return rng.choice((
        f"Once upon a time, there was {a(h.trait)} {h.kind.noun} named {h.name}. {h.He} lived {h.kind.home}. "
        f"{h.He} {habit}, and {h.he} loved to {hobby}.",
        f"{h.name} was {a(h.trait)} {h.kind.noun} who lived {h.kind.home}. {h.He} {habit}. "
        f"More than anything, {h.he} loved to {hobby}.",
        f"There once was {a(h.kind.noun)} named {h.name}. {h.name} was very {h.trait} and {habit}. "
        f"Every day, {h.he} liked to {hobby}.",
        f"Once upon a time, {a(h.trait)} {h.kind.noun} called {h.name} lived {h.kind.home}. "
        f"{h.His} favorite thing was to {hobby}.",
    ))


def ending(rng: random.Random, *morals: str) -> str:
    """The last paragraph: one of the arc's morals, sometimes closed with 'The end.'"""
    return para(rng.choice(morals), maybe(rng, "The end.", 0.2))


def lost_treasure(rng, h, f, elder, place):
    """Loses a toy, searches alone, a friend helps find it."""
    toy = f"{rng.choice(COLORS)} {rng.choice(TOYS)}"
    spot1, spot2, spot3 = rng.sample(PLACES[place], 3)
    return [
        para(f"{rng.choice(WHEN)}, {h.name} {h.kind.moves} to {place} with {h.his} {toy}.",
             rng.choice((f"{h.He} played with it all morning.", f"{h.He} showed it to everyone {h.he} met.",
                         f"{h.He} held it close and smiled.")),
             rng.choice((f"But when it was time to go home, the {toy} was gone!",
                         f"But after a while, {h.he} could not find it anywhere!"))),
        para(say(rng, h.name, "Oh no!", "cried", f"Where is my {toy}?"),
             f"{h.He} looked {spot1}, but it was not there. {h.He} looked {spot2}, but it was not there either.",
             rng.choice((f"{h.name} sat down and began to cry.", f"{h.name} felt very sad.",
                         f"{h.name} did not know what to do."))),
        para(arrival(rng, f, h),
             say(rng, f.name, rng.choice((f"Why are you sad, {h.name}?", "What is wrong?")), "asked"),
             say(rng, h.name, f"I lost my {toy}."),
             say(rng, f.name, rng.choice(("Do not worry. I will help you look.", "Let's look for it together.")))),
        para(f"{f.name} {f.kind.skill}, and {h.name} looked too.",
             maybe(rng, "They looked high and low."),
             f"At last, {f.name} found the {toy} {spot3}!",
             say(rng, f.name, "Here it is!", "shouted")),
        para(f"{h.name} was so happy.",
             say(rng, h.name, f"Thank you, {f.name}! You are a good friend.")),
        ending(rng, f"From that day on, {h.name} kept {h.his} {toy} safe, and {h.he} never forgot that friends "
                    f"help each other.",
               f"{h.name} learned that a problem feels smaller when a friend helps.",
               f"The two friends played together until the sun went down, and {h.name} held on tight to "
               f"{h.his} {toy}."),
    ]


def out_of_reach(rng, h, f, elder, place):
    """Wants something up high, fails twice, gets it with a friend's plan and shares it."""
    thing, short, where, enjoy = rng.choice(OUT_OF_REACH)
    plan, plan_done = rng.choice(PLANS)
    tries = [f"jumped as high as {h.he} could, but {h.he} could not reach it.",
             "stood on a log and stretched up, but it was still too high.",
             f"tried to climb up, but {h.he} slid back down."]
    rng.shuffle(tries)
    return [
        para(f"{rng.choice(WHEN)}, {h.name} {h.kind.moves} to {place}.",
             f"There {h.he} saw {thing} {where}.",
             rng.choice((f"{h.He} wanted it very much.", f"{h.He} wanted to get it down."))),
        para(f"{h.He} {tries[0]}", f"{rng.choice(('Then', 'Next,', 'After that,'))} {h.he} {tries[1]}",
             f"{h.name} sat down with a sigh."),
        para(arrival(rng, f, h),
             say(rng, f.name, "What are you doing?", "asked"),
             say(rng, h.name, f"I want to get the {short} down, but it is too high."),
             say(rng, f.name, plan)),
        para(fill(plan_done, h, f, thing=short),
             say(rng, h.name, rng.choice(("We did it!", "Hooray!")), "shouted")),
        para(fill(enjoy, h, f)),
        ending(rng, f"{h.name} learned that hard things are easier when friends work together.",
               f"From that day on, {h.name} and {f.name} did everything together.",
               f"{h.name} was glad that {h.he} had not tried all alone."),
    ]


def fear(rng, h, f, elder, place):
    """Is afraid of something, an elder gives advice, the hero tries and is brave."""
    what, trigger, react, confess, advice, attempt, success = rng.choice(FEARS)
    return [
        para(f"But there was one thing {h.name} did not like. {h.He} was afraid of {what}."),
        para(fill(trigger, h, f), fill(react, h, f),
             say(rng, h.name, rng.choice(("Oh no!", "I do not like this.", "Help!")), "whispered")),
        para(rng.choice((f"{elder} came and sat down next to {h.him}.", f"Soon {elder} found {h.him}.")),
             say(rng, elder, "What is wrong, little one?", "asked"),
             say(rng, h.name, confess),
             say(rng, elder, advice)),
        para(rng.choice((f"{h.name} took a deep breath.", f"{h.name} held {elder}'s hand.")),
             fill(attempt, h, f), fill(success, h, f)),
        ending(rng, f"{h.name} felt very proud of {h.himself}. Being brave does not mean you are never scared. "
                    f"It means you try anyway.",
               f"From then on, whenever {h.name} felt scared, {h.he} remembered what {elder} had said.",
               f"{h.name} learned that things are often less scary when you look at them closely."),
    ]


def try_again(rng, h, f, elder, place):
    """Makes something, it goes wrong, learns a tip, succeeds the second time."""
    goal, fail, tip, redo, done = rng.choice(PROJECTS)
    helper = rng.choice((elder, f.name))
    return [
        para(f"{rng.choice(WHEN)}, {h.name} decided to {goal}.",
             rng.choice((f"{h.He} worked very hard.", f"{h.He} got everything ready and began."))),
        para(fill(fail, h, f),
             say(rng, h.name, rng.choice(("It is too hard! I give up!", "I will never do it!")), "shouted")),
        para(f"{helper} came over and smiled.",
             say(rng, helper, "Don't give up. Everyone makes mistakes at first.", more=tip)),
        para(f"So {h.name} tried again.", fill(redo, h, f), fill(done, h, f),
             say(rng, h.name, "I did it!", "shouted")),
        ending(rng, f"{h.name} learned that if you keep trying, you can do hard things.",
               f"{h.name} learned that it is okay when things go wrong the first time.",
               f"{h.name} thanked {helper}, and {h.he} felt very proud."),
    ]


def sharing(rng, h, f, elder, place):
    """Two friends fight over one thing, an elder steps in, they take turns."""
    thing, shared = rng.choice(SHARED_THINGS)
    return [
        para(f"{rng.choice(WHEN)}, {h.name} and {introduce(rng, f, h)} were playing at {place}.",
             f"They both wanted {thing}."),
        para(say(rng, h.name, "It is mine! I saw it first!", "shouted"),
             say(rng, f.name, "No, it is mine!", "shouted"),
             rng.choice(("Soon they were both cross, and nobody was having any fun.",
                         "They argued and argued, and then they both sat far apart, feeling sad."))),
        para(f"{elder} saw them and came over.",
             say(rng, elder, "What is the matter?", "asked"),
             f"{h.name} and {f.name} told {elder} everything.",
             say(rng, elder, "When you share, everyone can have fun. Why not take turns?")),
        para(f"{h.name} thought about it.",
             say(rng, h.name, f"I am sorry, {f.name}. You can go first."),
             say(rng, f.name, "Thank you! And then it is your turn.", rng.choice(("said", "replied"))),
             fill(shared, h, f)),
        ending(rng, "Sharing made everything twice as fun.",
               f"{h.name} learned that sharing is better than fighting.",
               f"From that day on, {h.name} and {f.name} always took turns."),
    ]


def kindness(rng, h, f, elder, place):
    """Two friends find a small creature in trouble and help it."""
    creature, trouble, rescue, thanks = rng.choice(CREATURES)
    return [
        para(f"{rng.choice(WHEN)}, {h.name} and {introduce(rng, f, h)} went to {place}.",
             f"Suddenly, {h.name} saw {creature} {trouble}."),
        para(say(rng, h.name, "Oh, you poor thing!", "said", "Do not be scared. We will help you."),
             fill(rescue, h, f)),
        para(fill(thanks, h, f),
             say(rng, f.name, "We did a good thing today.")),
        ending(rng, f"{h.name} felt warm inside. Helping others, big or small, is always a good thing to do.",
               f"{h.name} learned that a little kindness can make a big difference.",
               f"That night, {h.name} told {elder} all about it, and {elder} was very proud."),
    ]


def adventure(rng, h, f, elder, place):
    """Sets off to see a far place, gets past two obstacles with a friend, comes home."""
    dest, view = rng.choice(DESTINATIONS)
    (obstacle1, past1), (obstacle2, past2) = rng.sample(OBSTACLES, 2)
    return [
        para(f"{elder} once told {h.name} about {dest}.", f"{h.name} wanted to see it more than anything."),
        para(f"{rng.choice(WHEN)}, {h.he} packed a snack and set off.",
             f"On the way, {h.he} met {introduce(rng, f, h)}.",
             say(rng, f.name, "Where are you going?", "asked"),
             say(rng, h.name, f"I am going to {dest}. Do you want to come?"),
             say(rng, f.name, "Yes, please!")),
        para(f"Soon they came to {obstacle1}.", past1, f"Then they came to {obstacle2}.", past2),
        para(f"At last, they reached {dest}.", view,
             say(rng, h.name, "Wow! It is so beautiful!"),
             "They sat down and shared their snack."),
        para("When the sun began to set, they went home, tired and happy.",
             f"That night, {h.name} told {elder} all about the adventure."),
        ending(rng, "Big adventures are even better with a friend.",
               f"{h.name} learned that there is always a way past the hard parts.",
               f"{h.name} fell asleep dreaming of the next adventure."),
    ]


def new_friend(rng, h, f, elder, place):
    """Is too shy to greet a newcomer, an elder encourages, they become friends."""
    game, played = rng.choice(GAMES)
    kind = f.kind.noun
    return [
        para(f"{rng.choice(WHEN)}, {h.name} went to {place}.",
             f"There {h.he} saw {a(kind)} sitting all alone.",
             f"The {kind} was new and did not know anyone."),
        para(f"{h.name} wanted to say hello, but {h.he} felt shy.",
             f"{h.He} ran back to tell {elder}.",
             say(rng, h.name, f"There is a new {kind}, but I am too shy to say hello."),
             say(rng, elder, "Just smile and say hello. That is how every friendship begins.")),
        para(f"So {h.name} walked over and smiled.",
             say(rng, h.name, f"Hello, I am {h.name}. Do you want to play {game}?", "asked"),
             f"The {kind} smiled back.",
             say(rng, f"the {kind}", f"Yes, please! My name is {f.name}.")),
        para(fill(played, h, f, spot=rng.choice(PLACES[place])),
             "They played until it was time to go home."),
        ending(rng, f"From that day on, {h.name} and {f.name} were best friends.",
               f"{h.name} learned that a new friend can be just one hello away.",
               f"{h.name} was glad {h.he} had been brave enough to say hello."),
    ]


def gift(rng, h, f, elder, place):
    """Makes a birthday present with a friend, it gets spoiled, they fix it, the elder loves it."""
    present, mishap, fix = rng.choice(GIFTS)
    return [
        para(f"{rng.choice(WHEN)}, {h.name} remembered that the next day was {elder}'s birthday.",
             f"{h.He} wanted to give {elder} a present, but {h.he} had nothing to give."),
        para(arrival(rng, f, h),
             say(rng, h.name, f"What can I give {elder}? I have nothing at all.", "asked"),
             say(rng, f.name, "You can make something! The best presents are made by hand.",
                 rng.choice(("said", "replied"))),
             say(rng, h.name, f"I know! I will make {present}.", "shouted")),
        para("The two friends worked all afternoon.", fill(mishap, h, f),
             say(rng, h.name, "Oh no! Now it is ruined.", "cried"),
             say(rng, f.name, "Don't worry. We can fix it together.")),
        para(fill(fix, h, f), f"{h.name} wrapped it up with a bright ribbon."),
        para(f"The next day, {h.name} gave {elder} the present.",
             say(rng, elder, f"Oh, {h.name}! This is the most wonderful present I have ever had."),
             f"{elder} gave {h.name} a big hug."),
        ending(rng, f"{h.name} learned that the best presents come from the heart.",
               f"{h.name} felt that giving was even better than getting.",
               f"{elder} kept the present for many years, and {h.name} never forgot that birthday."),
    ]


ARCS = (lost_treasure, out_of_reach, fear, try_again, sharing, kindness, adventure, new_friend, gift)


def tell_story(rng: random.Random) -> str:
    hero = make_character(rng)
    friend = make_character(rng, avoid=hero.name)
    elder = rng.choice(ELDERS)
    place = rng.choice(tuple(PLACES))
    arc = rng.choice(ARCS)
    return "\n\n".join([opening(rng, hero)] + arc(rng, hero, friend, elder, place))


def estimate_tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def generate_stories(n_tokens_approx: int = 5_000_000, seed: int = 0) -> Iterator[str]:
    """Yields stories until about n_tokens_approx GPT-2 tokens have been produced (the last one may overshoot).

    Story i is generated from its own Random(f"{seed}-{i}"), so it does not depend on how many came before.
    """
    produced = 0.0
    for i in itertools.count():
        if produced >= n_tokens_approx:
            return
        story = tell_story(random.Random(f"{seed}-{i}"))
        produced += estimate_tokens(story)
        yield story


def main() -> None:
    parser = argparse.ArgumentParser(description="Print stories from TinyTales, the offline training corpus.")
    parser.add_argument("--n-tokens", type=int, default=5_000_000, help="token budget of the whole stream")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same stories, in the same order")
    parser.add_argument("--num", type=int, default=3, help="how many stories to print; 0 = all within --n-tokens")
    args = parser.parse_args()
    stories = generate_stories(args.n_tokens, args.seed)
    for story in itertools.islice(stories, args.num or None):
        print(story, end="\n\n---\n\n")


if __name__ == "__main__":
    main()
