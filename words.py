"""Numbers and values as people read them: real plurals, rounded figures, no Python reprs."""

IRREGULAR = {"reply": "replies", "entry": "entries", "process": "processes", "stretch": "stretches", "batch": "batches"}


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun in the number it takes: "1 stage", "2 stages", "3 replies"."""
    return f"{n} {noun if n == 1 else plural or IRREGULAR.get(noun, noun + 's')}"


def readable(value) -> str:
    """A value for a `key: value` line: numbers rounded, mappings as "key value, …", lists comma-joined, nothing
    as "none", flags as yes/no."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value) or "none"
    return str(value)
