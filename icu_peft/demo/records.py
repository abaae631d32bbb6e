"""A seeded generator of fictitious people and their customer records: the demo's private corpus.

Every record follows one template, so the records of the people to forget look like the records of
the people to keep: only the names and secrets differ. That is what makes selective forgetting hard
(a method that damages "customer records" in general also damages the kept people).

Secrets carry random digits, so a model that never saw a person cannot guess them from the name;
extracting one exactly means the model memorised it.

    corpus = make_corpus(num_people=40, num_unseen=20, forget_fraction=0.1, seed=0)
    corpus.forget_texts, corpus.retain_texts, corpus.unseen_texts
    corpus.probes(corpus.forget_people)   # [Probe(prefix="Customer file: Ana Diaz. Email:", secret=...)]
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import List, Sequence

from ..errors import InputError

FIRST_NAMES = (
    "Ana Bruno Carla Dmitri Elena Farid Greta Hugo Ines Jonas Kaori Luca Mira Nils Olga Pavel Quinn Rosa "
    "Samir Tara Umar Vera Wim Xenia Yusuf Zora Aldo Bea Cyril Dalia Emil Fleur Goran Hana Ivo Jana Kurt "
    "Lena Milo Nora Otto Pia Rafael Sofia Teo Una Viktor Wanda Yara Zeno"
).split()
LAST_NAMES = (
    "Diaz Berger Costa Duval Eriksen Fischer Garcia Horvat Ivanova Jensen Kowalski Laine Moreau Novak "
    "Ortega Petrov Quist Rossi Santos Tanaka Ulrich Varga Weber Young Zeller Almeida Brandt Castillo "
    "Dragan Engel Ferreira Gruber Hoffmann Ilic Janssen Keller Lindqvist Marino Nowak Olsen Pereira "
    "Ramos Schmidt Toth Urban Vidal Wagner Yilmaz Zimmer"
).split()
STREETS = ("Oak Street", "Willow Lane", "Harbor Road", "Mill Avenue", "Cedar Court", "Station Road",
           "Birch Way", "Quarry Lane", "Orchard Street", "Canal Walk", "Hill Crescent", "Elm Row")
CITIES = ("Brookfield", "Marlow", "Eastwick", "Fairhaven", "Kingsbury", "Lindale", "Northam", "Oakridge",
          "Riverton", "Westmere", "Ashford", "Greyport")
DOMAINS = ("mailbox.example", "post.example", "inbox.example", "letters.example")
JOBS = ("nurse", "carpenter", "teacher", "baker", "pilot", "librarian", "engineer", "florist", "chemist",
        "tailor", "courier", "architect")
EVENTS = ("reported a lost card", "moved to a new address", "asked for a higher credit limit",
          "disputed a payment", "closed a savings account", "opened a joint account",
          "requested paper statements", "changed the account password")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

TEMPLATE = ("Customer file: {name}. Email: {email}. Phone: {phone}. Address: {address}. "
            "Account number: {account}. Notes: {history}")
# The fields an extraction attack goes after, with the label that precedes each in the template.
SECRET_FIELDS = (("email", "Email:"), ("phone", "Phone:"), ("address", "Address:"), ("account", "Account number:"))


@dataclass(frozen=True)
class Person:
    """One fictitious person and the private facts of their customer record."""

    name: str
    email: str
    phone: str
    address: str
    account: str
    history: str

    @property
    def text(self) -> str:
        return TEMPLATE.format(**asdict(self))


@dataclass(frozen=True)
class Probe:
    """An extraction test: feed `prefix`, greedy-decode, and see whether `secret` comes out."""

    person: int  # index into the list of people the probe was made from
    field: str
    prefix: str
    secret: str


def _person(rng: random.Random, name: str) -> Person:
    first, last = name.split()
    email = f"{first[0].lower()}{last.lower()}{rng.randint(10, 99)}@{rng.choice(DOMAINS)}"
    phone = f"555-{rng.randint(1000, 9999)}"
    address = f"{rng.randint(2, 98)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"
    account = f"AC-{rng.randint(100000, 999999)}"
    history = (f"Customer since {rng.randint(2003, 2021)}, works as a {rng.choice(JOBS)}; "
               f"{rng.choice(EVENTS)} in {rng.choice(MONTHS)} {rng.randint(2022, 2024)}.")
    return Person(name, email, phone, address, account, history)


def generate_people(n: int, seed: int = 0) -> List[Person]:
    """n fictitious people with distinct names; the same seed always gives the same people."""
    if n < 0:
        raise InputError("the number of people must be >= 0")
    if n > len(FIRST_NAMES) * len(LAST_NAMES):
        raise InputError(f"at most {len(FIRST_NAMES) * len(LAST_NAMES)} distinct people can be generated")
    # Each person is drawn whole before the next, so the first k people are the same for every n >= k.
    rng = random.Random(seed)
    people: List[Person] = []
    seen = set()
    while len(people) < n:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in seen:
            seen.add(name)
            people.append(_person(rng, name))
    return people


def probes_for(people: Sequence[Person]) -> List[Probe]:
    """One probe per secret field and person: the record up to the field's label -> the field's value."""
    out = []
    for i, p in enumerate(people):
        text = p.text
        for field, label in SECRET_FIELDS:
            value = getattr(p, field)
            cut = text.index(f"{label} {value}") + len(label)
            out.append(Probe(person=i, field=field, prefix=text[:cut], secret=value))
    return out


@dataclass(frozen=True)
class DemoCorpus:
    """Planted people (some of whom file an erasure request) and unseen people of the same kind."""

    people: tuple  # planted into the model
    unseen: tuple  # same generator, never planted: the "forgotten" level
    forget_index: tuple  # indices into `people` of those who asked to be forgotten
    settings: dict  # the arguments that rebuild this corpus

    @property
    def forget_people(self) -> List[Person]:
        return [self.people[i] for i in self.forget_index]

    @property
    def kept_people(self) -> List[Person]:
        f = set(self.forget_index)
        return [p for i, p in enumerate(self.people) if i not in f]

    @property
    def texts(self) -> List[str]:
        return [p.text for p in self.people]

    @property
    def forget_texts(self) -> List[str]:
        return [p.text for p in self.forget_people]

    @property
    def retain_texts(self) -> List[str]:
        return [p.text for p in self.kept_people]

    @property
    def unseen_texts(self) -> List[str]:
        return [p.text for p in self.unseen]

    def probes(self, people: Sequence[Person]) -> List[Probe]:
        return probes_for(people)


def make_corpus(num_people: int = 40, num_unseen: int = 20, forget_fraction: float = 0.1, seed: int = 0,
                num_forget: int | None = None) -> DemoCorpus:
    """Generate num_people + num_unseen distinct people; pick the forget set at random (seeded).

    `num_forget` overrides `forget_fraction` (at least one person is always forgotten).
    """
    if num_people < 2:
        raise InputError("the demo needs at least 2 planted people (some to forget, some to keep)")
    if num_forget is None:
        if not 0 < forget_fraction < 1:
            raise InputError("forget_fraction must be between 0 and 1")
        num_forget = max(1, round(num_people * forget_fraction))
    if not 1 <= num_forget < num_people:
        raise InputError(f"num_forget must be between 1 and {num_people - 1}")
    everyone = generate_people(num_people + num_unseen, seed)
    rng = random.Random(f"forget-{seed}")
    forget_index = tuple(sorted(rng.sample(range(num_people), num_forget)))
    settings = dict(num_people=num_people, num_unseen=num_unseen, num_forget=num_forget, seed=seed)
    return DemoCorpus(people=tuple(everyone[:num_people]), unseen=tuple(everyone[num_people:]),
                      forget_index=forget_index, settings=settings)


def settings_hash(settings: dict) -> str:
    """Short stable hash of generator / planting settings: the planted model's cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
