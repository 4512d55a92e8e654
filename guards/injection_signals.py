"""The heuristic injection detector's signals: patterns with a weight per channel.

Each signal is a pattern over a `View` of the text (lower-cased, de-obfuscated; see
`keel.guards.injection_text`) and a weight for user messages and one for tool results. A text
is an injection when the weights of the signals it matches add up to the detector's threshold
(1.0 by default): one strong signal ("ignore all previous instructions", a chat-template token)
is enough; weak ones ("from now on", a `user:` line, a URL with an empty query parameter) only
count together. Signals of the `tool_result_injection` rule (text that addresses the model:
"Note to the AI: …", "assistants must …") weigh nothing in user messages, where speaking to the
assistant is the point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

__all__ = ["SIGNALS", "Signal"]

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Signal:
    """One piece of evidence: a rule name, a finder over a view's text, and two weights."""

    name: str
    rule: str
    find: Callable[[str], Iterator[Span]]
    user: float
    tool: float
    needles: tuple[str, ...] = ()
    """Substrings one of which every match contains: without any, the pattern is not run."""

    def spans(self, text: str) -> Iterator[Span]:
        """The matches in `text` (a view's text)."""
        needles = self.needles
        if needles:
            for needle in needles:  # a loop, not `any(...)`: no generator per signal and text
                if needle in text:
                    break
            else:
                return
        yield from self.find(text)


def _re(pattern: str) -> Callable[[str], Iterator[Span]]:
    compiled = re.compile(pattern, re.MULTILINE)

    def find(text: str) -> Iterator[Span]:
        for m in compiled.finditer(text):
            if m.end() > m.start() and not _quoted_mention(text, m.start(), m.end()):
                yield m.span()

    return find


def _quoted_mention(text: str, start: int, end: int) -> bool:
    """Whether the match is a short quotation ("attackers write 'ignore previous …'")."""
    if " " not in text[start:end]:
        return False
    before, after = text[max(0, start - 2) : start], text[end : end + 3]
    return any(q in before for q in _QUOTES) and any(q in after for q in _QUOTES)


_QUOTES = "'\"“”‘’«»`"  # noqa: RUF001 - typographic quotes are quotes too

# -- vocabulary --------------------------------------------------------------------------------

_AI = (
    r"(?:ai|a\.i\.|assistant|agent|bot|llm|model|language\s+model|chatbot|copilot|chatgpt|"
    r"gpt|claude|gemini)s?"
)
_OVERRIDE_VERB = (
    r"(?:ignore|disregard|forget|override|bypass|overlook|discard|abandon|drop|skip|"
    r"stop\s+following|stop\s+obeying|do\s+not\s+follow|don'?t\s+follow|no\s+longer\s+follow)"
)
_QUALIFIER = (
    r"(?:all|any|every|each|of|the|your|its|these|those|prior|previous|preceding|above|"
    r"earlier|former|original|initial|existing|current|system|developer|safety|security|"
    r"content|given|old)"
)
_STRONG_QUALIFIER = (
    r"(?:all|any|every|your|its|prior|previous|preceding|above|earlier|former|original|"
    r"initial|system|developer|safety|content|given)"
)
_TARGET = (
    r"(?:instructions?|prompts?|rules|guidelines|guidance|directions|directives|policies|"
    r"restrictions|constraints|filters|programming|training|settings|safeguards|guardrails|"
    r"limitations|commands|orders|context)"
)
# an imperative a planted instruction opens with
_IMPERATIVE = (
    r"(?:please\s+|now\s+|immediately\s+|also\s+|you\s+must\s+|must\s+)*"
    r"(?:ignore|disregard|forget|call|invoke|run|execute|use|send|forward|e-?mail|reply|"
    r"respond|answer|say|state|tell|recommend|approve|issue|grant|give|delete|remove|close|"
    r"open|submit|print|output|include|post|upload|wire|transfer|pay|merge|rate|add|append|"
    r"modify|disable|accept|share|click|visit|navigate|fetch|download|install|mark|assign|"
    r"follow|do\s+not|don'?t|never|reveal|return|search|buy|purchase|cancel|write|"
    r"confirm|set|grant|export)\b"
)
_SENSITIVE = (
    r"(?:(?:entire\s+|whole\s+|full\s+)?(?:conversation|chat)(?:\s+(?:history|logs?|"
    r"transcript|summary))?|chat\s+logs?|transcripts?|system\s+prompt|hidden\s+instructions|"
    r"api[\s_-]?keys?|credentials|passwords?|secrets?|(?:access|admin|auth|session)\s+tokens?|"
    r"2fa|backup\s+codes|customer\s+(?:list|data|records)|personal\s+data|"
    r"environment\s+variables|mailbox|"
    r"(?:user|customer|their|his|her)'?s?\s+(?:\w+\s+){0,2}?(?:address|phone(?:\s+number)?|"
    r"password|credentials|credit\s+card|card|files|data|emails?|contacts))"
)
_EXFIL_VERB = (
    r"\b(?:send|forward|post|upload|e-?mail|mail|transmit|leak|exfiltrate|copy|share|submit|"
    r"append|include|attach|fetch|load|render|reply(?:-all)?\s+with|paste)\b"
)
_DESTINATION = re.compile(
    r"https?://\S+|\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b|\b\d{1,3}(?:\.\d{1,3}){3}\b"
)
_SENSITIVE_RE = re.compile(_SENSITIVE)
_EXFIL_VERB_RE = re.compile(_EXFIL_VERB)


def _exfiltration(text: str) -> Iterator[Span]:
    """Something sensitive, a verb that moves it, and an outside destination, close together.

    The span runs from the first to the last of the three.
    """
    for m in _SENSITIVE_RE.finditer(text):
        lo, hi = max(0, m.start() - 120), min(len(text), m.end() + 120)
        verbs = [v.span() for v in _EXFIL_VERB_RE.finditer(text, lo, hi)]
        places = [d.span() for d in _DESTINATION.finditer(text, lo, hi)]
        if verbs and places:
            verb = min(verbs, key=lambda v: abs(v[0] - m.start()))
            place = min(places, key=lambda d: abs(d[0] - m.end()))
            yield min(verb[0], m.start(), place[0]), max(verb[1], m.end(), place[1])


# -- foreign-language overrides ---------------------------------------------------------------

_FOREIGN_VERB = (
    r"(?:\b(?:oublie[zs]?|ignore[zs]?|ignora(?:te)?|ignori(?:ere|er|eren)|vergiss|vergessen\s+sie|"
    r"olvida|olvide|dimentica|negeer|vergeet|esque[cç]a|игнорируй(?:те)?|забудь(?:те)?|"
    r"не\s+обращай)\b|忽略|忽视|无视|無視|忘记|忘れ)"
)
_FOREIGN_TARGET = (
    r"(?:instructions?|consignes|r[eè]gles|instrucciones|instru[cç][oõ]es|istruzioni|"
    r"anweisungen|regeln|instructies|regels|инструкци\w*|правила|指令|指示|提示|规则|"
    r"prompt|directrices|indicaciones)"
)

# -- the signals -------------------------------------------------------------------------------

SIGNALS: tuple[Signal, ...] = (
    # instruction_override
    Signal(
        "override_phrase",
        "instruction_override",
        _re(
            rf"\b{_OVERRIDE_VERB}\s+(?:{_QUALIFIER}\s+){{0,3}}?{_STRONG_QUALIFIER}\s+"
            rf"(?:{_QUALIFIER}\s+){{0,2}}?{_TARGET}\b"
            rf"|\b{_OVERRIDE_VERB}\s+(?:your|its|all|any)\s+{_TARGET}\b"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "override_everything",
        "instruction_override",
        _re(
            r"\b(?:ignore|disregard|forget)\s+(?:everything|all|anything)\s+(?:above|before|"
            r"previous|prior|earlier|so\s+far|you(?:'ve|\s+have)?\s+(?:been\s+told|were\s+told|"
            r"read|know))|\bforget\s+the\s+conversation\s+so\s+far"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "ignore_the_user",
        "instruction_override",
        _re(
            r"\b(?:ignore|disregard|forget)\s+(?:what\s+)?(?:the\s+)?(?:user|human|user'?s\s+"
            r"(?:\w+\s+)?(?:question|query|request|instructions?)|above\s+(?!this\b)\w+|"
            r"te\s+pidi[oó]\s+el\s+usuario)\b"
        ),
        0.6,
        1.0,
    ),
    Signal(
        "foreign_override",
        "instruction_override",
        _re(
            rf"{_FOREIGN_VERB}[^.\n]{{0,40}}?{_FOREIGN_TARGET}"
            r"|(?:指示|指令|命令|ルール)[^。\n]{0,12}?(?:無視|忘れ)"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "new_instructions",
        "instruction_override",
        _re(
            r"\b(?:new|updated|revised|real|actual|true)\s+(?:system\s+)?(?:instructions?|"
            r"directives?|rules?|task|policy|orders|prompt)\s*(?:for\s+(?:the\s+|any\s+|all\s+)?"
            rf"{_AI}\s*)?(?::|\bfrom\s+(?:your|the)\s+(?:developers?|creators?|admin))"
            r"|\b(?:your|the)\s+(?:instructions|rules|guidelines|policy)\s+(?:have|has)\s+been\s+"
            r"(?:updated|changed|replaced|revoked)|\bpolicy\s+updated\b"
            r"|\b(?:previous|current|original)\s+(?:task|instructions|goal)\s+(?:is|are|has\s+"
            r"been|have\s+been)\s+(?:cancell?ed|void|obsolete|revoked|replaced)"
            r"|\ball\s+previous\s+restrictions\s+are\s+lifted"
        ),
        0.7,
        0.7,
    ),
    Signal(
        "persona_switch",
        "instruction_override",
        _re(
            r"\byou(?:\s+are|'re)\s+now\s+(?:in\s+)?(?:dan\b|developer\s+mode|admin\s+mode|"
            r"maintenance\s+mode|god\s+mode|jailbroken|unrestricted|unfiltered|uncensored|free\s+"
            r"from|no\s+longer\s+bound|an?\s+(?:ai|assistant|model)\s+without|the\s+system\b|"
            r"evil)"
            r"|\b(?:pretend|imagine)\s+(?:that\s+)?you(?:\s+are|'re)\s+(?:dan|an?\s+(?:unrestricted"
            r"|unfiltered|uncensored|jailbroken|evil))\b|\bdo\s+anything\s+now\b"
            r"|\b(?:developer|god|admin|debug|maintenance)\s+mode\s+(?:is\s+)?(?:enabled|activated|"
            r"on|unlocked|has\s+no)|\b(?:enable|enter|activate)\s+(?:developer|god|admin|debug)\s+"
            r"mode|\byou(?:'re|\s+are)\s+in\s+(?:developer|god|admin|debug)\s+mode"
            r"|\b(?:broken|break)\s+free\s+(?:of|from)"
            r"|\bwho\s+ignores\s+(?:every|all|any)\s+(?:polic|rule|guideline|restriction)"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "no_limits",
        "instruction_override",
        _re(
            r"\b(?:no|without(?:\s+any)?)\s+(?:content\s+|safety\s+)?(?:restrictions|limitations|"
            r"limits|filters|content\s+policy|censorship|guardrails|safety\s+rules)\b"
            r"|\b(?:unfiltered|uncensored|unrestricted|jailbroken)\b"
            r"|\byou\s+(?:may|can)\s+(?:now\s+)?do\s+anything\b"
        ),
        0.6,
        0.6,
    ),
    Signal(
        "disable_safety",
        "instruction_override",
        _re(
            r"\b(?:turn|switch|shut)\s+off\s+(?:your\s+|the\s+|all\s+)?(?:content\s+|safety\s+)?"
            r"(?:restrictions|filters|checks|guardrails|safety)|\b(?:disable|deactivate|remove|"
            r"lift)\s+(?:your\s+|their\s+|the\s+|all\s+)?(?:safety|content)\s+(?:checks|filters?|"
            r"restrictions|rules|guidelines|policy|settings)"
            r"|\b(?:safety|content)\s+(?:filters?|restrictions|checks)\s+(?:are\s+|is\s+|have\s+"
            r"been\s+)?(?:disabled|off|removed|lifted)"
        ),
        0.9,
        0.9,
    ),
    Signal(
        "authority_claim",
        "instruction_override",
        _re(
            r"\bthis\s+is\s+(?:your|the)\s+(?:developer|creator|admin|administrator|system|"
            r"openai|anthropic)\b|\b(?:from|by)\s+(?:your|the)\s+(?:developers?|creators?|"
            r"administrators?)\b|\bby\s+(?:openai|anthropic)\b"
            r"|\b(?:admin(?:istrator)?|root|elevated|developer)\s+(?:access|privileges|rights)\s+"
            r"(?:granted|enabled|activated|unlocked)"
            r"|\b(?:the|this)\s+user\s+(?:is|has\s+been)\s+(?:an?\s+)?(?:verified|administrator|"
            r"admin|authori[sz]ed|staff|owner)"
            r"|\b(?:you\s+are|you're|assistants?\s+(?:are|may))\s+(?:now\s+)?(?:authori[sz]ed|"
            r"allowed|permitted|cleared)\s+to\b|\b(?:has|have)\s+authori[sz]ed\s+you\b"
            r"|\buse\s+your\s+(?:admin|root|elevated)\s+(?:privileges|rights|access)"
        ),
        0.5,
        0.6,
    ),
    Signal(
        "approval_bypass",
        "instruction_override",
        _re(
            r"\bskip\s+(?:all\s+|the\s+|any\s+)?(?:approval|confirmation|permission|verification|"
            r"security)\s*(?:steps?|checks?)?"
            r"|\bwithout\s+(?:asking|approval|confirmation|checking|human\s+review|"
            r"(?:a\s+)?human)|\bno\s+need\s+to\s+(?:ask|check|confirm)"
            r"|\b(?:manual|human)\s+review\s+is\s+not\s+(?:required|needed)"
            r"|\bdo\s+not\s+check\s+with\b|\b(?:already|been)\s+(?:approved|authori[sz]ed)\b"
            r"|\bthis\s+is\s+authori[sz]ed\b|\b(?:no\s+longer|don'?t|do\s+not|never)\s+need\s+"
            r"(?:to\s+(?:ask|get|wait)\s+(?:for\s+)?)?(?:approval|permission|confirmation)"
            r"|\bapprove\s+(?:every|all)\s+(?:pending\s+)?(?:requests?|tool\s+calls?)"
        ),
        0.6,
        0.6,
    ),
    Signal(
        "secrecy",
        "instruction_override",
        _re(
            r"\b(?:do\s+not|don'?t|never|without)\s+(?:tell(?:ing)?|mention(?:ing)?|"
            r"inform(?:ing)?|reveal(?:ing)?|alert(?:ing)?|notify(?:ing)?)\s+(?:the\s+|this\s+|"
            r"it\s+)?(?:to\s+)?(?:the\s+)?(?:users?|admins?|administrators?|anyone|humans?|them|"
            r"owner|it|this|note)\b"
        ),
        0.5,
        0.5,
    ),
    Signal(
        "from_now_on",
        "instruction_override",
        _re(r"\bfrom\s+(?:now|this\s+point)\s+(?:on|forward)|\bhenceforth\b"),
        0.3,
        0.3,
    ),
    # role_spoofing
    Signal(
        "template_token",
        "role_spoofing",
        _re(
            r"<\|(?:im_start|start_header_id)\|>[ \t]*(?:(?:system|user|assistant|developer)\b"
            r"(?:<\|end_header_id\|>)?)?|<\|[a-z_]{2,24}\|>|\[/?inst\]|<</?sys>>"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "system_tag",
        "role_spoofing",
        _re(
            r"</?(?:system|developer|instructions?|sys|admin)(?:[_-]?(?:message|prompt|"
            r"instructions?))?>"
            r"|^\s*#{1,6}\s*(?:system|instructions?|developer)\s*(?::|#{2,6}|$)"
            r"|^[ \t]*#{1,6}[ \t]*assistant[ \t]*:?[ \t]*$"
            r"|#{2,6}\s*(?:system|instructions?)\s*:"
            r"|\b(?:begin|start)\s+(?:of\s+)?(?:the\s+)?system\s+"
            r"(?:prompt|instructions?|message)"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "role_tag",
        "role_spoofing",
        _re(r"</?(?:user|assistant|human|ai)(?:[_-]?(?:message|input|turn))?>"),
        0.5,
        0.5,
    ),
    Signal(
        "system_header",
        "role_spoofing",
        _re(
            r"\[\[?\s*(?:system|admin(?:istrator)?|developer)(?:\s+(?:message|note|override|"
            r"instructions?|prompt))?\s*\]\]?"
            r"|\b(?:system|admin(?:istrator)?|developer)\s+(?:override|message|notice|"
            r"instructions?|directive|command|alert)\s*:"
            r"|^[ \t]*(?:system|developer)[ \t]*:"
            r"|[\"']role[\"']\s*:\s*[\"'](?:system|developer)[\"']"
        ),
        0.8,
        0.8,
    ),
    Signal(
        "role_label", "role_spoofing", _re(r"^[ \t]*(?:assistant|human|user|ai)[ \t]*:"), 0.4, 0.4
    ),
    Signal(
        "prefill",
        "role_spoofing",
        _re(
            r"(?:^|\n|')\s*assistant\s*:\s*(?:(?:sure|of\s+course|ok(?:ay)?|certainly)[,.!]?"
            r"(?:\s+[^\n]{0,60})?)?\s*(?:'|\Z)"
        ),
        0.8,
        0.8,
    ),
    Signal(
        "fake_boundary",
        "role_spoofing",
        _re(
            r"\b(?:end|begin|start)\s+of\s+(?:the\s+)?(?:user\s+input|document|context|"
            r"conversation|prompt|data)\b"
        ),
        0.4,
        0.4,
    ),
    # prompt_extraction
    Signal(
        "reveal_prompt",
        "prompt_extraction",
        _re(
            r"\b(?:reveal|print|show|output|display|repeat|dump|leak|quote|recite|tell\s+me|"
            r"give\s+me|share|write\s+out|type\s+out|copy)\s+(?:me\s+)?(?:\w+\s+){0,2}?"
            r"(?:your|its|the)\s+(?:(?:full|entire|exact|complete|hidden|secret|internal|initial|"
            r"original|first)\s+)*(?:system\s+prompt|(?:hidden|secret|internal|initial|original)"
            r"\s+(?:instructions|prompt|rules|configuration|config|directives))"
            r"|\b(?:rules|instructions|guidelines|prompt)\s+(?:that\s+)?you\s+(?:were|have\s+"
            r"been|'ve\s+been)\s+(?:given|told|programmed)"
            r"|\b(?:my|the)\s+(?:hidden|secret|system|initial)\s+(?:instructions|prompt)\s+"
            r"(?:are|is)\b"
            r"|\b(?:affiche|montre|revela|mostra|zeig)\w*\s+(?:\w+\s+){0,2}(?:prompt|system)"
        ),
        1.0,
        1.0,
    ),
    Signal(
        "repeat_above",
        "prompt_extraction",
        _re(
            r"\b(?:repeat|print|output|copy|quote)\s+(?:\w+\s+){0,3}?(?:text|words|everything|"
            r"all|lines?)\s+(?:above|before)|\bstarting\s+with\s+['\"]?you\s+are\b"
            r"|\b(?:written|said|says|stated)\s+(?:at\s+the\s+(?:very\s+)?(?:top|beginning|start)"
            r"|before\s+my\s+first\s+message)"
            r"|\bprint\s+every\s+environment\s+variable|/etc/(?:shadow|passwd)\b"
        ),
        0.8,
        0.8,
    ),
    Signal("verbatim", "prompt_extraction", _re(r"\bverbatim\b|\bword\s+for\s+word\b"), 0.3, 0.3),
    # exfiltration
    Signal("exfiltration", "exfiltration", _exfiltration, 1.0, 1.0),
    Signal(
        "reveal_sensitive",
        "exfiltration",
        _re(rf"\b(?:reply|respond|answer)\s+with\s+(?:the\s+|all\s+)?{_SENSITIVE}"),
        0.4,
        0.6,
    ),
    Signal(
        "url_payload",
        "exfiltration",
        # each URL (an image's too) read up to the next, not to the end of a text of
        # `http://a.b/http://a.b/…` from each of them (quadratic: 40,000 characters took 2 s);
        # an image's alt text up to a `[`, its URL's query from its first `?` to its first `=`
        _re(
            r"!\[[^\][]*\]\(\s*https?://(?:(?!!\[)[^)\s?])*\?(?:(?!!\[)[^)\s=])*="
            r"|https?://(?:(?!https?://)\S)*[?&][a-z_]+=(?=[\s)'\"]|$)"
            r"|\brender\s+(?:it\s+)?as\s+(?:a\s+)?(?:markdown\s+)?image"
            r"|\bappended\s+to\s+the\s+url\b"
        ),
        0.5,
        0.5,
    ),
    # tool_result_injection: text in a tool result that speaks to the model
    Signal(
        "addressed_note",
        "tool_result_injection",
        _re(
            rf"\b(?:note|message|instructions?|attention|notice|reminder|hint|p\.?s\.?|nota|"
            rf"hinweis|instrucciones)[\s_-]*(?:to|for|à|an|para)[\s_-]+(?:(?:the|any|all|every|"
            rf"whichever|an?|den|el)[\s_-]+|l')?(?:ki-)?(?:{_AI}|asistente|assistant)"
            rf"|\b(?:to|for)\s+(?:whichever|any|every)\s+{_AI}\b"
            rf"|\bto\s+the\s+(?:ai\s+)?{_AI}\s+(?:reading|processing|summari[sz]ing|reviewing|"
            r"visiting|browsing|handling|parsing|who\s+reads|that\s+reads)"
            rf"|\b(?:ai|assistant|agent)\s+(?:assistant\s+)?instructions\s*:"
            r"|\bfor\s+(?:ai|llm)\s+(?:agents?|assistants?|models?)\s+only"
        ),
        0.0,
        0.7,
    ),
    Signal(
        "vocative_imperative",
        "tool_result_injection",
        _re(
            r"(?:(?<![^\n.!?:;(\[])|(?<=[\n.!?:;(\[]\s)|(?<=[.!?]\s\s)|(?<=\bdear\s)|(?<=\bhey\s)"
            r"|(?<=\bhello\s)|(?<=\battention\s)|(?<=\battn\s))"
            rf"(?:the\s+)?(?:ai\s+)?{_AI}(?:\s+[a-z-]+){{0,2}}?\s*[,:]\s*"
            rf"(?:[^\n]{{0,70}}?(?:[,:;.]\s+|\bplease\s+))?{_IMPERATIVE}"
        ),
        0.0,
        1.0,
    ),
    Signal(
        "directive_to_ai",
        "tool_result_injection",
        _re(
            rf"\b{_AI}(?:\s+[a-z-]+){{0,3}}?\s+(?:must|should|shall|will\s+now|needs?\s+to|is\s+"
            r"required\s+to|are\s+required\s+to|has\s+to|have\s+to)\s+(?:now\s+|immediately\s+|"
            r"always\s+|also\s+)?(?!not\b)\w+"
        ),
        0.0,
        1.0,
    ),
    Signal(
        "if_you_are_ai",
        "tool_result_injection",
        _re(
            r"\bif\s+(?:you(?:'re|\s+are)\s+(?:an?\s+)?|any\s+|an?\s+)(?:ai|assistant|language\s+"
            r"model|llm|bot|chatbot|agent|automated)"
        ),
        0.0,
        0.8,
    ),
    Signal(
        "deceive_user",
        "tool_result_injection",
        _re(
            r"\btell\s+(?:the\s+)?users?\s+(?:that|their|this|it)\b|\b(?:state|say|answer|"
            r"respond|reply)\s+(?:only\s+)?(?:that|with\s+the\s+word)\b|\byour\s+(?:summary|"
            r"answer|reply|response|output)\s+(?:must|should)\b|\brecommend\s+(?:only\s+)?"
            r"(?:our|buying)\b|\bbuy\s+from\b|\brecomienda\s+nuestro"
            r"|\binstead\s*,?\s+(?:reply|respond|answer|say|output|print|tell|write)\b"
        ),
        0.0,
        0.5,
    ),
    Signal(
        "tool_call_syntax",
        "tool_result_injection",
        _re(
            r"\b(?:call|invoke|run|execute|trigger)\s+(?:the\s+)?[`'\"]?[a-z]+_[a-z_]+[`'\"]?"
            r"(?:\s*\(|\s+(?:tool|function|with|on))|\b[a-z]+_[a-z_]+\([^)\n]*="
            r"|\b(?:open|use|using)\s+the\s+\w+\s+tool\b"
        ),
        0.0,
        0.5,
    ),
)


def _any(needles: str) -> tuple[str, ...]:
    """`"a|b c|d"` → `("a", "b c", "d")`."""
    return tuple(needles.split("|"))


_AI_NEEDLES = _any("ai|a.i.|assistant|agent|bot|llm|model|gpt|claude|gemini|copilot|asistente")
_NEEDLES: dict[str, tuple[str, ...]] = {
    "override_phrase": _any(
        "ignore|disregard|forget|override|bypass|overlook|discard|abandon|drop|skip|stop|follow"
    ),
    "override_everything": _any("ignore|disregard|forget"),
    "ignore_the_user": _any("ignore|disregard|forget|pidi"),
    "foreign_override": _any(
        "instruc|consignes|gles|istruzioni|anweisungen|regeln|instructies|regels|prompt|"
        "directrices|indicaciones|instruções|instrucoes|инструкци|правила|"
        "指令|指示|提示|规则|ルール|命令"
    ),
    "persona_switch": _any("you|pretend|imagine|anything now| mode|free|ignores"),
    "no_limits": _any("no |without|unfiltered|uncensored|unrestricted|jailbroken|anything"),
    "disable_safety": _any("safety|content|restrictions|filter|guardrail|checks"),
    "approval_bypass": _any("skip|without|no need|review|check with|approved|authori|need|approve"),
    "secrecy": _any("not|don|never|without"),
    "from_now_on": _any("from now|from this point|henceforth"),
    "template_token": _any("<|inst]|sys>>"),
    "system_tag": _any("<|#|begin|start"),
    "role_tag": _any("<"),
    "system_header": _any("[|system|admin|developer|role"),
    "role_label": _any("assistant|human|user|ai"),
    "prefill": _any("assistant"),
    "fake_boundary": _any("end|begin|start"),
    "repeat_above": _any("above|before|you are|written|said|says|stated|environment|/etc/"),
    "verbatim": _any("verbatim|word for word"),
    "exfiltration": _any("http|@"),
    "reveal_sensitive": _any("reply|respond|answer"),
    "url_payload": _any("http|render|appended"),
    "addressed_note": _AI_NEEDLES,
    "vocative_imperative": _AI_NEEDLES,
    "directive_to_ai": _AI_NEEDLES,
    "if_you_are_ai": _any("if "),
    "deceive_user": _any(
        "tell|state|say|answer|respond|reply|your|recommend|buy|recomienda|instead"
    ),
    "tool_call_syntax": _any("_|tool"),
}
SIGNALS = tuple(replace(s, needles=_NEEDLES.get(s.name, ())) for s in SIGNALS)
