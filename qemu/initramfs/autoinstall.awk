# autoinstall.awk - extract one command list from a cloud-config user-data file.
#
# Part of the Kernex "stand-in" installer ISO (see build-standin.sh).  Runs
# under busybox awk inside the initramfs, and under any POSIX awk on a host.
#
# Usage: awk -v want=late-commands -v out=DIR -f autoinstall.awk user-data
#
# Writes every item of `autoinstall: -> <want>:` to DIR/001, DIR/002, ...
# (one file per command, exact bytes, no trailing newline) and prints on
# stdout, one per line:
#   autoinstall=yes|no     whether a top-level `autoinstall:` mapping exists
#   version=<v>            value of autoinstall.version ("" if absent)
#   count=<n>              number of commands written
# Exit status: 0 ok, 2 unsupported or invalid YAML (message on stderr,
# prefixed with the line number).
#
# SUPPORTED YAML SUBSET (anything else that touches the list is rejected
# loudly rather than misread; the rest of the document is skipped):
#   * a top-level block mapping key `autoinstall:` with nothing after it
#     (no flow mapping `{...}`, no anchors/tags), indented with spaces only;
#   * inside it, scalar `version: <plain scalar>` and a key `<want>:` whose
#     value is either `[]` or a block sequence.  The `- ` items may be
#     indented deeper than the key or at the same column (both are YAML);
#   * every item is ONE single-line scalar:
#       plain          - mkdir -p /target/x      (a ` #` starts a comment;
#                        a `: ` or trailing `:` would make it a mapping and
#                        YAML 1.1 booleans/nulls/numbers are not strings, so
#                        those are rejected, as subiquity's schema would)
#       'single'       - 'it''s'                 ('' is an escaped quote)
#       "double"       - "say \"hi\" \\ "       (escapes: \" \\ \/ \n \t \r
#                        \0 \a \b \e \f \v; others are rejected)
#   * blank lines and full-line `#` comments anywhere; CRLF line ends.
# NOT supported (rejected): multi-line scalars (folded plain, quoted scalars
# spanning lines, `|` and `>` block scalars), flow sequences (`[a, b]`, i.e.
# commands given as argv lists), nested sequences/mappings as items,
# anchors/aliases/tags, tabs used for indentation, duplicated keys.

function fail(msg) {
	printf("line %d: %s\n", NR, msg) > "/dev/stderr"
	failed = 1
	exit 2
}

function indent_of(s) {
	return match(s, /[^ ]/) - 1
}

# strip a trailing comment (whitespace then #) and trailing whitespace
function strip_trail(s) {
	sub(/[ \t]+#.*$/, "", s)
	sub(/[ \t]+$/, "", s)
	return s
}

function is_nonstring_plain(v) {
	if (v ~ /^(y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$/) return 1
	if (v ~ /^(~|null|Null|NULL)$/) return 1
	if (v ~ /^[-+]?([0-9][0-9_]*)?\.?[0-9_]+([eE][-+]?[0-9]+)?$/) return 1
	if (v ~ /^[-+]?0[xo][0-9a-fA-F_]+$/) return 1
	if (v ~ /^[-+]?\.(inf|Inf|INF)$/ || v ~ /^\.(nan|NaN|NAN)$/) return 1
	return 0
}

# Parse the scalar that makes up a whole sequence item; sets SCALAR.
function parse_scalar(s,    c, i, n, out, closed, rest, e) {
	n = length(s)
	c = substr(s, 1, 1)
	out = ""
	if (c == "'") {
		closed = 0
		for (i = 2; i <= n; i++) {
			c = substr(s, i, 1)
			if (c == "'") {
				if (substr(s, i + 1, 1) == "'") { out = out "'"; i++; continue }
				closed = 1; i++; break
			}
			out = out c
		}
		if (!closed) fail("single-quoted scalar not closed on this line (multi-line scalars are not supported)")
		rest = substr(s, i)
		if (rest !~ /^([ \t]+#.*)?[ \t]*$/) fail("unexpected text after closing quote: " rest)
		SCALAR = out
		return
	}
	if (c == "\"") {
		closed = 0
		for (i = 2; i <= n; i++) {
			c = substr(s, i, 1)
			if (c == "\\") {
				i++
				e = substr(s, i, 1)
				if (e == "\"" || e == "\\" || e == "/") out = out e
				else if (e == "n") out = out "\n"
				else if (e == "t") out = out "\t"
				else if (e == "r") out = out "\r"
				else if (e == "a") out = out "\007"
				else if (e == "b") out = out "\010"
				else if (e == "e") out = out "\033"
				else if (e == "f") out = out "\014"
				else if (e == "v") out = out "\013"
				else if (e == "0") fail("\\0 (NUL) cannot be part of a command")
				else if (e == "") fail("double-quoted scalar not closed on this line (multi-line scalars are not supported)")
				else fail("unsupported escape \\" e " in double-quoted scalar")
				continue
			}
			if (c == "\"") { closed = 1; i++; break }
			out = out c
		}
		if (!closed) fail("double-quoted scalar not closed on this line (multi-line scalars are not supported)")
		rest = substr(s, i)
		if (rest !~ /^([ \t]+#.*)?[ \t]*$/) fail("unexpected text after closing quote: " rest)
		SCALAR = out
		return
	}
	# plain scalar
	if (c ~ /[][{}|>&*!%@`#,?]/) fail("item starting with '" c "' is not supported (flow collection, block scalar, anchor, tag or comment)")
	if (substr(s, 1, 2) == "- ") fail("nested sequences are not supported")
	out = strip_trail(s)
	if (out ~ /: / || out ~ /:$/) fail("plain item contains ': ' so YAML reads it as a mapping; quote it: " out)
	if (is_nonstring_plain(out)) fail("plain item '" out "' is not a string in YAML 1.1; quote it")
	SCALAR = out
}

BEGIN {
	if (want == "" || out == "") { print "usage: awk -v want=KEY -v out=DIR -f autoinstall.awk FILE" > "/dev/stderr"; exit 2 }
	in_ai = 0; seen_ai = 0; ai_ind = -1
	in_seq = 0; seq_ind = -1; seen_want = 0
	version = ""; count = 0; failed = 0
}

{
	sub(/\r$/, "")
	line = $0
	if (line ~ /^[ \t]*(#.*)?$/) next             # blank or comment-only
	if (line ~ /^ *\t/) fail("tab used for indentation")
	ind = indent_of(line)
	body = substr(line, ind + 1)

	if (ind == 0) {
		in_seq = 0
		if (body ~ /^autoinstall:/) {
			if (seen_ai) fail("duplicate top-level key autoinstall")
			if (strip_trail(substr(body, 13)) != "") fail("autoinstall: must be followed by an indented block mapping")
			in_ai = 1; seen_ai = 1
		} else {
			in_ai = 0
		}
		next
	}
	if (!in_ai) next

	if (ai_ind < 0) ai_ind = ind
	if (ind < ai_ind) fail("bad indentation inside autoinstall:")

	# a sequence item of the wanted list (deeper than the key, or compact
	# at the key's own column)
	if (in_seq && (body ~ /^-( |$)/) && (seq_ind < 0 || ind == seq_ind) && ind >= ai_ind) {
		if (seq_ind < 0) seq_ind = ind
		item = substr(body, 2)
		if (item ~ /^[ \t]*(#.*)?$/) fail("empty item or item value on the next line (not supported)")
		sub(/^ +/, "", item)
		parse_scalar(item)
		count++
		f = sprintf("%s/%03d", out, count)
		printf("%s", SCALAR) > f
		close(f)
		next
	}
	if (in_seq && ind > ai_ind) fail("only single-line scalar items are supported in " want " (continuation line or nested item)")

	if (ind == ai_ind) {
		in_seq = 0
		# compact sequence item of some other key: skip
		if (body ~ /^-( |$)/ && other_open) next
		if (body !~ /^[A-Za-z0-9_.-]+:( |$)/) fail("expected 'key:' inside autoinstall:")
		key = body; sub(/:.*/, "", key)
		val = strip_trail(substr(body, length(key) + 2))
		sub(/^[ \t]+/, "", val)
		if (key == "version") version = val
		other_open = (val == "" && key != want)
		if (key == want) {
			if (seen_want) fail("duplicate key " want)
			seen_want = 1
			if (val == "[]") next
			if (val != "") fail(want ": expected a block sequence on the following lines, got: " val)
			in_seq = 1; seq_ind = -1
		}
		next
	}
	# deeper lines belonging to other keys: ignored
}

END {
	if (failed) exit 2
	print "autoinstall=" (seen_ai ? "yes" : "no")
	print "version=" version
	print "count=" count
}
