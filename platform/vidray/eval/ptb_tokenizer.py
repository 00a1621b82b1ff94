"""The PTB tokenization pycocoevalcap scores captions with, in pure Python (no JVM).

pycocoevalcap's `PTBTokenizer` writes every caption of a call on one line of a file (newlines
inside a caption become spaces), runs Stanford CoreNLP 3.4.1's `PTBTokenizer` over it with
`-preserveLines -lowerCase`, and drops the tokens in its `PUNCTUATIONS` list. This module
re-implements that lexer (CoreNLP's `PTBLexer.flex` as of release 3.4.1, the jar pycocoevalcap
ships) with the options that command line sets:

* the traditional (not strict) Treebank-3 state and the lexer's default flags: quotes become
  `` `` `` / `''` (and `` ` `` / `'`), ( ) [ ] { } become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-,
  "..." forms become "...", 3-4 hyphens and &mdash;-like dashes become "--", cent/pound/euro
  signs become "cents" / "#" / "$", "cannot", "gonna" etc. are split ("can not", "gon na"), no
  americanization and no escaping of "/" and "*";
* `tokenizeNLs`: the line breaks are tokens, so one output line per input line;
* untokenizable characters are deleted (`untokenizable=firstDelete`; the jar also logs the first);
* every token is lower-cased afterwards (`-lowerCase`), *after* the bracket normalisation: the
  jar prints "-lrb-", which is not in pycocoevalcap's punctuation list, so it stays a word.

The lexer follows JFlex semantics: at each position the rule with the longest match wins (text
matched by a rule's trailing context counts toward its length, then goes back to the input),
ties go to the rule written first, and literal letters match either case while character
classes keep theirs (`%caseless`). Like the JFlex 1.4 scanner, it reads UTF-16 code units:
a character outside the Basic Multilingual Plane (an emoji) is two surrogates, which no rule
but a URL/e-mail/SGML pattern accepts, so it is normally deleted as untokenizable. Java's
character classes come from the Unicode tables of the JDK that generated the scanner; see
`_LETTER_NOT_IN_JAR` for the letters Python knows and the jar does not.

`tests/data/ptb_captions.txt` holds a corpus of punctuated captions and the jar's output for
it; `tests/test_caption_metrics.py` checks this module against both, and against the jar itself
where Java and pycocoevalcap are installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import regex

# pycocoevalcap's PTBTokenizer drops exactly these tokens (after the jar lower-cased them, so
# "-LRB-" and friends never match and "-lrb-" stays in the caption).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
NEWLINE_TOKEN = "*NL*"
# Line breaks of the lexer's NEWLINE macro other than "\n" (\u0085 is lexed as an ellipsis).
# pycocoevalcap only turns "\n" inside a caption into a space; any of these would give the jar
# an extra output line and shift every later caption onto the wrong item. Here they are spaces.
_OTHER_LINE_BREAKS = str.maketrans({"\r": " ", "\u2028": " ", "\u2029": " ", "\x0b": " ", "\x0c": " "})

# ---------------------------------------------------------------------------------------------
# Character classes. JFlex's [:letter:], [:digit:] and [:uppercase:] are Java's isLetter,
# isDigit and isUpperCase over the Basic Multilingual Plane, as the generating JDK knew them.

# The scanner was generated with a Unicode 6.x JDK, Python 3.11 has Unicode 14 tables. These
# ranges are where they disagree, measured by lexing every BMP character alone and in five
# contexts with the jar and with this module (docs/fidelity.md, "Caption scores"): letters and
# digits added to Unicode since, Cherokee capitals (letters, but Lo, not Lu, until Unicode 8) and
# two Mongolian letters that Unicode 9 made combining marks. A Python with newer tables than 14
# would count the letters added since 14 as letters where the jar does not.
_LETTER_NOT_IN_JAR: tuple[tuple[int, int], ...] = (
    (0x037F, 0x037F), (0x0528, 0x052F), (0x0560, 0x0560), (0x0588, 0x0588), (0x05EF, 0x05EF),
    (0x0860, 0x086A), (0x0870, 0x0887), (0x0889, 0x088E), (0x08A1, 0x08A1), (0x08AD, 0x08C9),
    (0x0978, 0x0978), (0x0980, 0x0980), (0x09FC, 0x09FC), (0x0AF9, 0x0AF9), (0x0C34, 0x0C34),
    (0x0C5A, 0x0C5A), (0x0C5D, 0x0C5D), (0x0C80, 0x0C80), (0x0CDD, 0x0CDD), (0x0D04, 0x0D04),
    (0x0D54, 0x0D56), (0x0D5F, 0x0D5F), (0x0E86, 0x0E86), (0x0E89, 0x0E89), (0x0E8C, 0x0E8C),
    (0x0E8E, 0x0E93), (0x0E98, 0x0E98), (0x0EA0, 0x0EA0), (0x0EA8, 0x0EA9), (0x0EAC, 0x0EAC),
    (0x13F5, 0x13F5), (0x13F8, 0x13FD), (0x16F1, 0x16F8), (0x170D, 0x170D), (0x171F, 0x171F),
    (0x1878, 0x1878), (0x191D, 0x191E), (0x19B0, 0x19C0), (0x19C8, 0x19C9), (0x1B4C, 0x1B4C),
    (0x1C80, 0x1C88), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1CF2, 0x1CF3), (0x1CFA, 0x1CFA),
    (0x2C2F, 0x2C2F), (0x2C5F, 0x2C5F), (0x312E, 0x312F), (0x31BB, 0x31BF), (0x4DB6, 0x4DBF),
    (0x9FCD, 0x9FFF), (0xA698, 0xA69D), (0xA78F, 0xA78F), (0xA794, 0xA79F), (0xA7AB, 0xA7CA),
    (0xA7D0, 0xA7D1), (0xA7D3, 0xA7D3), (0xA7D5, 0xA7D9), (0xA7F2, 0xA7F7), (0xA8FD, 0xA8FE),
    (0xA9E0, 0xA9E4), (0xA9E6, 0xA9EF), (0xA9FA, 0xA9FE), (0xAA7E, 0xAA7F), (0xAB30, 0xAB5A),
    (0xAB5C, 0xAB69), (0xAB70, 0xABBF),
)
_LETTER_ONLY_IN_JAR: tuple[tuple[int, int], ...] = ((0x1885, 0x1886),)
_DIGIT_NOT_IN_JAR: tuple[tuple[int, int], ...] = ((0x0DE6, 0x0DEF), (0xA9F0, 0xA9F9))
_UPPER_NOT_IN_JAR: tuple[tuple[int, int], ...] = ((0x13A0, 0x13F5),)


def _codes(ranges: tuple[tuple[int, int], ...]) -> frozenset[int]:
    return frozenset(code for low, high in ranges for code in range(low, high + 1))


def _class_body(predicate: Callable[[str], bool]) -> str:
    """The BMP characters for which `predicate` holds, as ranges for a regex character class."""
    body: list[str] = []
    start = None
    for code in range(0x10001):
        inside = code <= 0xFFFF and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            end = code - 1
            body.append(f"\\u{start:04X}" if start == end else f"\\u{start:04X}-\\u{end:04X}")
            start = None
    return "".join(body)


@lru_cache(maxsize=None)
def _letter_body() -> str:
    left_out, added = _codes(_LETTER_NOT_IN_JAR), _codes(_LETTER_ONLY_IN_JAR)
    return _class_body(lambda c: c.isalpha() and ord(c) not in left_out or ord(c) in added)


@lru_cache(maxsize=None)
def _digit_body() -> str:
    left_out = _codes(_DIGIT_NOT_IN_JAR)
    return _class_body(lambda c: c.isdecimal() and ord(c) not in left_out)


@lru_cache(maxsize=None)
def _upper_body() -> str:
    # Java's isUpperCase: Lu and Other_Uppercase (Roman numerals, circled capitals), as isupper.
    left_out = _codes(_UPPER_NOT_IN_JAR) | _codes(_LETTER_NOT_IN_JAR)
    return _class_body(lambda c: c.isupper() and ord(c) not in left_out)


# ---------------------------------------------------------------------------------------------
# The lexer's macros, in Python regex syntax. Two conventions carry JFlex's meaning over:
# an ASCII letter outside a character class matches either case (`%caseless`; `_caseless`
# rewrites it to [xX]), and {NAME} is a macro, expanded as a non-capturing group. The
# placeholders <LETTER_CLASS>, <DIGIT_CLASS> and <UPPER_CLASS> stand for the Unicode classes.

# Letters the flex file adds to [:letter:] by hand (combining marks, later Latin/Greek/...).
_EXTRA_LETTERS = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
    r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
    r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F"
    r"\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F"
    r"\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963"
    r"\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C"
    r"\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
    r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E"
    r"\u0EB1-\u0EBC\u0EC8-\u0ECD"
)
# Symbols that are tokens of their own (U+2200-U+2BFF: mathematical and other symbols).
_MISC_SYMBOLS = (
    r"+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387"
    r"\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E"
    r"\u066A\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
    r"\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65"
)
_NOT_URL = r' \t\n\f\r"<>|(){}'  # characters no URL contains

_MACROS: dict[str, str] = {
    "SGML": (
        r"<(?:[!?][A-Za-z\-][^>\r\n]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?"
        r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
    ),
    "SPMDASH": r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]",
    "SPAMP": r"&amp;",
    "SPPUNC": r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);",
    "SPLET": r"&[aeiouAEIOU](?:acute|grave|uml);",
    "SPACE": r"[ \t\u00A0\u2000-\u200A\u3000]",
    "SPACES": r"{SPACE}+",
    "NEWLINE": r"\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085]",
    "SPACENL": r"{SPACE}|{NEWLINE}",
    "SPACENLS": r"{SPACENL}+",
    "SENTEND": r"{SPACENL}(?:{SPACENL}|[<UPPER_CLASS>]|{SGML})",
    "DIGIT": r"[<DIGIT_CLASS>\u07C0-\u07C9]",
    "DATE": r"{DIGIT}{1,2}[\-/]{DIGIT}{1,2}[\-/]{DIGIT}{2,4}",
    "NUM": r"{DIGIT}+|{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+",
    "NUMBER": r"[\-+]?{NUM}",
    "SUBSUPNUM": r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
    "FRAC": r"(?:{DIGIT}{1,4}[\- \u00A0])?{DIGIT}{1,4}(?:\\?/|\u2044){DIGIT}{1,4}",
    "FRAC2": r"[\u00BC\u00BD\u00BE\u2153-\u215E]",
    "DOLSIGN": r"[A-Z]*\$|\#",
    "DOLSIGN2": r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
    "LETTER": r"[<LETTER_CLASS><EXTRA_LETTERS>]|{SPLET}",
    "WORD": r"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*",
    "FILENAME_EXT": (
        r"bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3"
        r"|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip"
    ),
    "FILENAME": r"(?:{LETTER}|{DIGIT})+(?:[.](?:{LETTER}|{DIGIT})+)*(?:[.](?:{FILENAME_EXT}))",
    # THING uses the bare Unicode classes, not LETTER/DIGIT.
    "ALNUM": r"[<LETTER_CLASS><DIGIT_CLASS>]",
    "THING": (
        r"(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+"
        r"(?:{HYPHEN}(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+)*"
    ),
    "THINGA": r"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+",
    "THING3": r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",
    "APOS": r"['\u0092\u2019]|&apos;",
    "APOSETCETERA": r"{APOS}|[`\u0091\u2018\u201B]",
    "HTHING": r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{ACRO2}\.))+",
    "REDAUX": r"{APOS}(?:[msdMSD]|re|ve|ll)",
    "SWORD": r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*",
    "SREDAUX": r"n{APOSETCETERA}t",
    "APOWORD": (
        r"{APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em"
        r"|[A-HJ-XZn]{APOSETCETERA}[<LETTER_CLASS>]{2}[<LETTER_CLASS>]*|{APOS}[2-9]0s|{APOS}till?"
        r"|[<LETTER_CLASS>][<LETTER_CLASS>]*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z][<LETTER_CLASS>]*"
        r"|{APOS}cause|cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{APOSETCETERA}o"
    ),
    "APOWORD2": r"y{APOS}",
    "FULLURL": rf"https?://[^{_NOT_URL}]+[^{_NOT_URL}.!?,\-]",
    # ",-_" in the second class is a range (U+002C..U+005F: digits, capitals and more), as in the jar.
    "LIKELYURL": (
        rf"(?:www\.(?:[^{_NOT_URL}.!?,]+\.)+[a-zA-Z]{{2,4}}"
        rf"|(?:[^{_NOT_URL}`'.!?,-_$]+\.)+(?:com|net|org|edu))"
        rf"(?:/[^ \t\n\f\r\"<>|()]+[^{_NOT_URL}.!?,\-])?"
    ),
    "EMAIL": (
        r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@"
        r"(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?"
    ),
    "TWITTER": r"@[a-zA-Z_][a-zA-Z_0-9]*|\#{LETTER}+",
    "ABMONTH": r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec",
    "ABDAYS": r"Mon|Tue|Tues|Wed|Thu|Thurs|Fri",
    "ABSTATE": (
        r"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass"
        r"|Md|Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo"
    ),
    "ABCOMP": r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys",
    "ABNUM": r"tel|est|ext|sq",
    "ABPTIT": r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq",
    "ABBREV1": r"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq|Bldg)\.",
    "ACRO_SPECIAL": r"(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R)",
    "ACRO": r"[A-Za-z](?:\.[A-Za-z])*|{ACRO_SPECIAL}",
    "ACRO2": r"[A-Za-z](?:\.[A-Za-z])+|{ACRO_SPECIAL}",
    "ABTITLE": (
        r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt"
        r"|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
        r"|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"
    ),
    "ABCOMP2": r"Invt|Elec|Natl|M[ft]g|Dept",
    "ABBREV4": r"{ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{ACRO}|{ABCOMP2}",
    "ABBREV2": r"(?:{ABBREV4})\.",
    "ACRONYM": r"(?:{ACRO})\.",
    "ABBREV3": r"(?:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\.",
    "PHONE": (
        r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
        r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}"
        r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
    ),
    "LESSTHAN": r"<|&lt;",
    "GREATERTHAN": r">|&gt;",
    "HYPHEN": r"[\-_\u058A\u2010\u2011]",
    "HYPHENS": r"\-+",
    "LDOTS": r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]",
    "FNMARKS": r"@+|\#+|_+",
    "ASTS": r"\*+|(?:\\\*){1,3}",
    "INSENTP": r"[,;:\u3001]",
    "QUOTES": (
        r"{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F"
        r"\u2039\u203A\u00AB\u00BB]{1,2}"
    ),
    "DBLQUOT": r"\"|&quot;",
    "TBSPEC": (
        r"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"
        r"|Cap{APOS}n|c{APOS}est"
    ),
    "TBSPEC2": r"{APOS}[0-9][0-9]",
    "SMILEY": r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]",
    # The first alternative is what the flex file says: its "\[" escapes the bracket that was
    # meant to open a class, so it matches a literal "[^x=~<>]" after "<c>.".
    "ASIANSMILEY": (
        r"[\^x=~<>]\.\[\^x=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']"
        r"|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)"
    ),
    "MISCSYMBOL": rf"[{_MISC_SYMBOLS}]",
    # The words after which an acronym's period also ends the sentence (case-sensitive first
    # letter: the flex file writes [A]bout).
    "ACRONYM_NEXT": (
        r"[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er"
        r"|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne"
        r"|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here"
        r"|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou|{SGML}"
    ),
}


def _caseless(pattern: str) -> str:
    """Rewrite each ASCII letter outside character classes, escapes and {NAME}s to [xX]."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            width = {"u": 6, "x": 4}.get(pattern[i + 1], 2)
            out.append(pattern[i : i + width])
            i += width
        elif char == "[":
            j = i + 1
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i : j + 1])
            i = j + 1
        elif char == "{" or char == "<" and pattern[i + 1 : i + 2].isupper():  # {NAME}, {m,n}, <CLASS>
            j = pattern.index("}" if char == "{" else ">", i)
            out.append(pattern[i : j + 1])
            i = j + 1
        elif char == "(" and pattern[i + 1] == "?":
            out.append("(?:")
            i += 3
        elif char.isascii() and char.isalpha():
            out.append(f"[{char.lower()}{char.upper()}]")
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


@lru_cache(maxsize=None)
def _macro(name: str) -> str:
    return _expand(_MACROS[name])


def _expand(pattern: str) -> str:
    """Caseless rewrite, then macros and the Unicode class placeholders substituted."""
    pattern = _caseless(pattern)
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            width = {"u": 6, "x": 4}.get(pattern[i + 1], 2)
            out.append(pattern[i : i + width])
            i += width
        elif pattern[i] == "{" and pattern[i + 1].isalpha():
            j = pattern.index("}", i)
            out.append(f"(?:{_macro(pattern[i + 1 : j])})")
            i = j + 1
        else:
            out.append(pattern[i])
            i += 1
    return (
        "".join(out)
        .replace("<LETTER_CLASS>", _letter_body())
        .replace("<EXTRA_LETTERS>", _EXTRA_LETTERS)
        .replace("<DIGIT_CLASS>", _digit_body())
        .replace("<UPPER_CLASS>", _upper_body())
    )


# ---------------------------------------------------------------------------------------------
# Token normalisations (the lexer's actions).

_LEFT_SINGLE = str.maketrans({c: "`" for c in "\u0091\u2018\u201B\u2039"})
_RIGHT_SINGLE = str.maketrans({c: "'" for c in "\u0092\u2019\u203A"})
_LEFT_DOUBLE = str.maketrans({c: "``" for c in "\u0093\u201C\u00AB"})
_RIGHT_DOUBLE = str.maketrans({c: "''" for c in "\u0094\u201D\u00BB"})
_FRACTIONS = str.maketrans({"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_CURRENCY = str.maketrans({"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"})
_PARENS = str.maketrans({"(": "-LRB-", ")": "-RRB-"})
_AMP_ENTITY = regex.compile(r"&amp;", regex.IGNORECASE)


def _latex_quotes(text: str, probably_left: bool) -> str:
    """ASCII quotes by the guessed side, curly and cp1252 quotes by their own side."""
    single, double = ("`", "``") if probably_left else ("'", "''")
    text = text.replace("&apos;", single).replace("'", single)
    text = text.replace('"', double).replace("&quot;", double)
    return text.translate(_LEFT_SINGLE).translate(_RIGHT_SINGLE).translate(_LEFT_DOUBLE).translate(_RIGHT_DOUBLE)


def _remove_soft_hyphens(text: str) -> str:
    return text.replace("\u00AD", "") or "-"


# An action gets the text matched by the rule (without trailing context) and returns
# (token or None, number of characters consumed): fewer than matched when it pushes back.
Action = Callable[[str], "tuple[str | None, int]"]


def _emit(transform: Callable[[str], str] = lambda text: text) -> Action:
    return lambda text: (transform(text), len(text))


def _skip(text: str) -> tuple[None, int]:
    return None, len(text)


def _push_back(count: int) -> Action:
    """Emit the text less its last `count` characters, which are lexed again ("can" + "not")."""
    return lambda text: (text[:-count], len(text) - count)


def _period_again(text: str) -> tuple[str, int]:
    """An abbreviation that also ends the sentence: the token keeps its period, and the
    period is lexed again as a token of its own."""
    return text, len(text) - 1


def _strip_trailing_space(text: str) -> str:
    # The flex actions trim spaces and line breaks a buggy trailing context may leave on the text.
    while text and (text[-1] in " \t\u0085" or "\n" <= text[-1] <= "\r"):
        text = text[:-1]
    return text


def _acronym_at_sentence_end(text: str) -> tuple[str, int]:
    text = _strip_trailing_space(text)
    if len(text) == 2:  # "I." before "The": the letter, then the period
        return text[:1], 1
    return _period_again(text)


def _abbrev3(text: str) -> tuple[str, int]:
    text = _strip_trailing_space(text)
    return text, len(text)


def _hyphens(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00A0")


def _amp(text: str) -> str:
    return _AMP_ENTITY.sub("&", text)


def _const(token: str) -> Action:
    return lambda text: (token, len(text))


# (rule, trailing context or None, action), in the flex file's order (which breaks ties).
_RULES: list[tuple[str, str | None, Action]] = [
    (r"c[+][+]", None, _emit()),
    (r"(?:c|f)\#", None, _emit()),
    (r"cannot", None, _push_back(3)),
    (r"'twas", None, _push_back(3)),
    (r"'tis", None, _push_back(2)),
    (r"gonna|gotta|lemme|gimme|wanna", None, _push_back(2)),
    (r"{SGML}", None, _emit(_nbsp)),
    (r"{SPMDASH}", None, _const("--")),
    (r"{SPAMP}", None, _emit(_amp)),
    (r"{SPPUNC}", None, _emit()),
    (r"{WORD}", r"{REDAUX}", _emit(_remove_soft_hyphens)),
    (r"{SWORD}", r"{SREDAUX}", _emit(_remove_soft_hyphens)),
    (r"{WORD}", None, _emit(_remove_soft_hyphens)),
    (r"{APOWORD}", None, _emit()),
    (r"{APOWORD2}", r"[<LETTER_CLASS>]", _emit()),
    (r"{FULLURL}", None, _emit()),
    (r"{LIKELYURL}", None, _emit()),
    (r"{EMAIL}", None, _emit()),
    (r"{TWITTER}", None, _emit()),
    (r"{REDAUX}", r"[^A-Za-z]", _emit(lambda text: _latex_quotes(text, False))),
    (r"{SREDAUX}", r"[^A-Za-z]", _emit(lambda text: _latex_quotes(text, False))),
    (r"{DATE}", None, _emit()),
    (r"{NUMBER}", None, _emit(_remove_soft_hyphens)),
    (r"{SUBSUPNUM}", None, _emit()),
    (r"{FRAC}", None, _emit(_nbsp)),
    (r"{FRAC2}", None, _emit(lambda text: text.translate(_FRACTIONS))),
    (r"{TBSPEC}", None, _emit(_amp)),
    (r"{THING3}", None, _emit()),
    (r"{DOLSIGN}", None, _emit()),
    (r"{DOLSIGN2}", None, _emit(lambda text: text.translate(_CURRENCY))),
    (r"{ACRONYM}", r"{SPACENLS}(?:{ACRONYM_NEXT}){SPACENL}", _acronym_at_sentence_end),
    (r"{ABBREV3}", r"{SPACENL}?[<DIGIT_CLASS>]", _abbrev3),
    (r"(?:pt[eyEY]|co)\.", r"{SPACE}(?:ltd|lim)", _emit()),
    (r"{ABBREV1}", r"{SENTEND}", _period_again),
    (r"{ABBREV1}", r"[\x00-\uFFFF][\x00-\uFFFF]", _emit()),
    (r"{ABBREV1}", None, _period_again),
    (r"{ABBREV2}", None, _emit()),
    (r"{ABBREV4}", r"{SPACE}", _emit()),
    (r"{ACRO}", r"{SPACENL}", _emit()),
    (r"{TBSPEC2}", r"{SPACENL}", _emit()),
    (r"{FILENAME}", r"{SPACENL}|[.?!,]", _emit()),
    (r"{WORD}\.", r"{INSENTP}", _emit(_remove_soft_hyphens)),
    (r"{PHONE}", None, _emit(lambda text: _nbsp(text).translate(_PARENS))),
    (r"{DBLQUOT}", r"[A-Za-z0-9$]", _emit(lambda text: _latex_quotes(text, True))),
    (r"{DBLQUOT}", None, _emit(lambda text: _latex_quotes(text, False))),
    (r"\x7F", None, _skip),
    (r"{LESSTHAN}", None, _const("<")),
    (r"{GREATERTHAN}", None, _const(">")),
    (r"{SMILEY}", r"[^A-Za-z0-9]", _emit(lambda text: text.translate(_PARENS))),
    (r"{ASIANSMILEY}", None, _emit(lambda text: text.translate(_PARENS))),
    (r"\{", None, _const("-LCB-")),
    (r"\}", None, _const("-RCB-")),
    (r"\[", None, _const("-LSB-")),
    (r"\]", None, _const("-RSB-")),
    (r"\(", None, _const("-LRB-")),
    (r"\)", None, _const("-RRB-")),
    (r"{HYPHENS}", None, _emit(_hyphens)),
    (r"{LDOTS}", None, _const("...")),
    (r"{FNMARKS}", None, _emit()),
    (r"{ASTS}", None, _emit()),
    (r"{INSENTP}", None, _emit()),
    (r"[?!]+", None, _emit()),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _emit()),
    (r"=", None, _emit()),
    (r"/", None, _emit()),
    (r"{HTHING}\.", r"{INSENTP}", _emit(_remove_soft_hyphens)),
    (r"{HTHING}", None, _emit(_remove_soft_hyphens)),
    (r"{THING}\.", r"{INSENTP}", _emit()),
    (r"{THING}", None, _emit()),
    (r"{THINGA}\.", r"{INSENTP}", _emit(_amp)),
    (r"{THINGA}", None, _emit(_amp)),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _emit(lambda text: _latex_quotes(text, True))),
    (r"{REDAUX}", None, _emit(lambda text: _latex_quotes(text, False))),
    (r"{SREDAUX}", None, _emit(lambda text: _latex_quotes(text, False))),
    (r"{QUOTES}", None, _emit(lambda text: _latex_quotes(text, False))),
    (r"<<|>>", None, _emit()),
    (r"{MISCSYMBOL}", None, _emit()),
    (r"\x00|{SPACES}|[\u200B\u200E\u200F\uFEFF]", None, _skip),
    (r"{NEWLINE}", None, _const(NEWLINE_TOKEN)),
    (r"&nbsp;", None, _skip),
    (r"[^\n]", None, _skip),  # untokenizable: deleted
]


@lru_cache(maxsize=None)
def _compiled_rules() -> list[tuple[regex.Pattern, bool, Action]]:
    """Each rule as one POSIX (leftmost-longest) pattern; trailing context after group "head"."""
    rules = []
    for head, trailing, action in _RULES:
        if trailing is None:
            pattern = _expand(head)
        else:
            pattern = f"(?P<head>{_expand(head)})(?:{_expand(trailing)})"
        rules.append((regex.compile(pattern, regex.POSIX | regex.V0), trailing is not None, action))
    return rules


@lru_cache(maxsize=4096)
def _rules_starting_with(char: str) -> tuple[tuple[regex.Pattern, bool, Action], ...]:
    """The rules (in order) that have a match beginning with `char`: a partial match of the
    one-character string says it can begin one. The others need not be tried at that position."""
    return tuple(rule for rule in _compiled_rules() if rule[0].match(char, partial=True) is not None)


def _to_utf16_units(text: str) -> str:
    """Split characters beyond U+FFFF into surrogate pairs: the scanner reads UTF-16 units."""
    if all(ord(char) <= 0xFFFF for char in text):
        return text
    units = []
    for char in text:
        code = ord(char)
        if code > 0xFFFF:
            code -= 0x10000
            units.append(chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF)))
        else:
            units.append(char)
    return "".join(units)


def _from_utf16_units(token: str) -> str:
    """Join surrogate pairs back into characters (a lone surrogate stays as it is)."""
    if not any("\ud800" <= char <= "\udfff" for char in token):
        return token
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


# Shortcuts for the commonest stretches of a caption, which the full rule set lexes the same
# way: a run of blanks that starts with a space or a tab is skipped whole (no rule but SPACES
# starts with either; a no-break space can also begin a LIKELYURL), and a run of ASCII letters
# followed by a blank, a line break or the end is a token of its own (WORD; longer rivals need a
# period, apostrophe, hyphen, slash, "@", "$", "&" or "+" inside the run, and the rules that also
# take the blank after it, ACRO and ABBREV4, give the same token) unless it is one of the words
# the assimilation rules split ("cannot", "gonna", ...).
_BLANKS = regex.compile(r"[ \t][ \t\u00A0\u2000-\u200A\u3000]*")
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> list[str]:
    """The lexer's tokens for `text` (newline tokens included), before lower-casing."""
    text = _to_utf16_units(text)
    tokens: list[str] = []
    position = 0
    while position < len(text):
        blanks = _BLANKS.match(text, position)
        if blanks is not None:
            position = blanks.end()
            continue
        word = _PLAIN_WORD.match(text, position)
        if word is not None and word.group().lower() not in _SPLIT_WORDS:
            tokens.append(word.group())
            position = word.end()
            continue
        best = None
        best_length = 0
        for pattern, has_trailing, action in _rules_starting_with(text[position]):
            match = pattern.match(text, position)
            if match is not None and match.end() - position > best_length:
                best, best_length = (match, has_trailing, action), match.end() - position
        if best is None:  # only "\n" can miss every rule, and NEWLINE takes it
            raise AssertionError(f"no rule matches at {position}: {text[position:position + 20]!r}")
        match, has_trailing, action = best
        token, consumed = action(match.group("head") if has_trailing else match.group(0))
        if token is not None:
            tokens.append(_from_utf16_units(token))
        position += consumed
    return tokens


def ptb_tokenize_lines(lines: Sequence[str]) -> list[list[str]]:
    """What the jar prints for these lines with `-preserveLines -lowerCase`, split into tokens.

    The lines are lexed as one text joined by "\\n", as the jar reads pycocoevalcap's file, so a
    line's last token can depend on how the next line starts (as in the jar).
    """
    if not lines:
        return []
    out: list[list[str]] = [[]]
    for token in _lex("\n".join(lines)):
        if token == NEWLINE_TOKEN:
            out.append([])
        else:
            out[-1].append(token.lower())
    return out


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on a list of captions: each caption's tokens, punctuation
    dropped, joined by single spaces (the strings its scorers receive)."""
    lines = [caption.replace("\n", " ").translate(_OTHER_LINE_BREAKS) for caption in captions]
    tokenized = []
    for tokens in ptb_tokenize_lines(lines):
        words = " ".join(tokens).rstrip().split(" ")
        tokenized.append(" ".join(word for word in words if word not in PUNCTUATIONS))
    return tokenized
