"""The launch syntax: ``"test-src epochs=2 ! xor-delta workers=2 ! rle ! null-sink"``.

Elements are a factory name followed by ``prop=value`` words; ``!`` links the
element before it to the one after; ``name=t`` names an element and ``t.``
refers to it, so ``tee name=t ! a  t. ! b`` feeds two branches. Values may be
quoted (``pattern="a b"``). Every error is a ParseError whose caret points at
the offending word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ConfigError, ParseError
from . import registry
from .registry import load
from .stage import Stage

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_+-]*$")


@dataclass
class Token:
    text: str
    position: int


@dataclass
class ElementWords:
    """An element as written: factory name and its ``prop=value`` words."""

    factory: Token
    properties: list[tuple[Token, Token]] = field(default_factory=list)


@dataclass
class Description:
    """A parsed launch string: elements, references and the links between them (by item index)."""

    text: str
    items: list[ElementWords | Token]
    links: list[tuple[int, int]]


def tokenize(text: str) -> list[Token]:
    """Split into words and ``!`` links; quotes group, and are removed from, a word."""
    tokens: list[Token] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        if char == "!":
            tokens.append(Token("!", index))
            index += 1
            continue
        start, word = index, []
        while index < len(text) and not text[index].isspace() and text[index] != "!":
            if text[index] in "\"'":
                quote, opened = text[index], index
                closing = text.find(quote, index + 1)
                if closing < 0:
                    raise ParseError("unterminated quote", text, opened)
                word.append(text[index + 1:closing])
                index = closing + 1
            else:
                word.append(text[index])
                index += 1
        tokens.append(Token("".join(word), start))
    return tokens


def parse_description(text: str) -> Description:
    """The structure of a launch string, without loading any stage."""
    items: list[ElementWords | Token] = []
    links: list[tuple[int, int]] = []
    pending_link: Token | None = None
    previous_was_link = False
    for token in tokenize(text):
        if token.text == "!":
            if not items or previous_was_link:
                raise ParseError("'!' must follow an element", text, token.position)
            pending_link, previous_was_link = token, True
            continue
        previous_was_link = False
        if "=" in token.text:
            current = items[-1] if items else None
            if not isinstance(current, ElementWords) or pending_link is not None:
                raise ParseError("property without an element before it", text, token.position)
            key, _, value = token.text.partition("=")
            offset = text.find("=", token.position) + 1
            current.properties.append((Token(key, token.position), Token(value, offset)))
            continue
        if token.text.endswith("."):
            name = token.text[:-1]
            if not _NAME.match(name):
                raise ParseError(f"bad element reference {token.text!r}", text, token.position)
            item: ElementWords | Token = Token(name, token.position)
        else:
            if not _NAME.match(token.text):
                raise ParseError(f"expected a stage name, found {token.text!r}", text, token.position)
            after = items[-1] if items and pending_link is None else None
            if isinstance(after, ElementWords) and after.properties and token.text not in registry.factories():
                last_key, last_value = after.properties[-1]
                raise ParseError(f"{token.text!r} follows {last_key.text}={last_value.text} without '!' and is no "
                                 f"stage: a value with a space needs quotes "
                                 f"({last_key.text}=\"{last_value.text} {token.text}\"), "
                                 f"a new element follows '!'", text, token.position)
            item = ElementWords(token)
        items.append(item)
        if pending_link is not None:
            links.append((len(items) - 2, len(items) - 1))
            pending_link = None
    if pending_link is not None:
        raise ParseError("'!' at the end links to nothing", text, pending_link.position)
    if not items:
        raise ParseError("empty pipeline description", text, 0)
    return Description(text, items, links)


def caret(text: str, position: int) -> str:
    """The two lines pointing at ``position`` in ``text`` (as ParseError formats them)."""
    return f"\n  {text}\n  {' ' * position}^"


def build_stage(words: ElementWords, text: str) -> Stage:
    """Load the factory and set its properties; ParseError at the offending word."""
    try:
        stage_class = load(words.factory.text)
    except ConfigError as exc:
        raise ParseError(str(exc), text, words.factory.position) from None
    known = stage_class.properties()
    values = {}
    for key, value in words.properties:
        prop = known.get(key.text.replace("_", "-"))
        if prop is None:
            raise ParseError(f"{words.factory.text}: unknown property {key.text!r}; known: {', '.join(sorted(known))}",
                             text, key.position)
        if prop.type == "object":
            raise ParseError(f"{words.factory.text}: property {prop.name} takes a Python object; "
                             "set it from the Python API", text, key.position)
        try:
            values[prop.attribute] = prop.parse_text(value.text)
        except ConfigError as exc:
            raise ParseError(f"{words.factory.text}: {exc}", text, value.position) from None
    try:
        return stage_class(**values)
    except ConfigError as exc:
        raise ParseError(str(exc), text, words.factory.position) from None


def resolve(description: Description) -> tuple[list[Stage], list[tuple[Stage, Stage]], dict[int, int]]:
    """Stages, links between them, and each stage's position in the text (by ``id``)."""
    text = description.text
    stages: list[Stage] = []
    positions: dict[int, int] = {}
    item_stage: dict[int, Stage] = {}
    by_name: dict[str, Stage] = {}
    for index, item in enumerate(description.items):
        if isinstance(item, ElementWords):
            stage = build_stage(item, text)
            if stage.name:
                if stage.name in by_name:
                    raise ParseError(f"two elements are named {stage.name!r}", text, item.factory.position)
                by_name[stage.name] = stage
            stages.append(stage)
            positions[id(stage)] = item.factory.position
            item_stage[index] = stage
    for index, item in enumerate(description.items):
        if isinstance(item, Token):
            if item.text not in by_name:
                raise ParseError(f"no element is named {item.text!r}", text, item.position)
            item_stage[index] = by_name[item.text]
    links = [(item_stage[a], item_stage[b]) for a, b in description.links]
    return stages, links, positions
