from prism_ray.output import parse_output


def test_full_answer():
    p = parse_output("yes\n<contribution>Water boils at 100 C.</contribution>\n<evidence>At 1 atm water boils at 100 C.</evidence>")
    assert p.verdict == "yes"
    assert p.contribution == "Water boils at 100 C."
    assert p.evidence == "At 1 atm water boils at 100 C."


def test_no_answer_has_no_tags():
    p = parse_output("no")
    assert (p.verdict, p.contribution, p.evidence) == ("no", None, None)


def test_unclosed_tags_do_not_crash():
    p = parse_output("yes\n<contribution>cut here\n<evidence>and the evidence was cut")
    assert p.contribution == "cut here"
    assert p.evidence == "and the evidence was cut"
    assert parse_output("yes <evidence>").evidence == ""


def test_garbage_and_missing_parts():
    p = parse_output("banana </evidence> <contribution")
    assert (p.verdict, p.contribution, p.evidence) == (None, None, None)
    assert parse_output("").verdict is None
    assert parse_output("yes<evidence>e</evidence>").contribution is None
