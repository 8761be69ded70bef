# unit.awk - read a systemd service unit (plus drop-ins) the way systemd
# would for the directives the stand-in emulates.
#
# Part of the Kernex "stand-in" installer ISO (see build-standin.sh).  Runs
# under busybox awk inside the initramfs.
#
# Usage: awk -v unit=NAME.service -v out=DIR -f unit.awk UNITFILE [DROPIN.conf...]
#
# Output (files in DIR):
#   type restart restart_ms limit_interval_ms limit_burst workdir
#                          one value each
#   env.NNN                one KEY=VALUE per Environment= assignment, in order
#   pre.N.flags, pre.N.NNN     ExecStartPre= command N: prefix flags, argv words
#   start.N.flags, start.N.NNN ExecStart= command N
#   notes                  one line per directive that is NOT emulated
# stdout: "pre=<n> start=<n>".  Exit 2 on an error systemd would also refuse
# (bad quoting or escape, unknown specifier, several ExecStart= for a
# non-oneshot service, no ExecStart=).
#
# Emulated, following systemd.service(5)/systemd.exec(5)/systemd.syntax(7):
#   * [Section] headers, `#`/`;` comment lines, Key=Value with blanks around
#     `=`, lines ending in `\` joined with the next (the `\` becomes a space),
#     drop-ins applied after the unit, an empty `ExecStart=` resetting the list;
#   * specifiers %% %n %N %p %i %I %j %t %S %C %L %E %T %V %h %u %U %g %G;
#   * command lines split into words with "..." and '...' quoting anywhere in
#     a word and C escapes (\a \b \f \n \r \t \v \\ \" \' \s \xHH \NNN) in
#     and outside quotes;
#   * prefixes - (ignore failure), : (no variable expansion), + ! !! (ignored:
#     everything runs as root), @ (argv[0]: rejected, not emulated);
#   * variable expansion from Environment=: "$$" -> "$", "${NAME}" inside a
#     word, and a word that is exactly "$NAME" replaced by the value split at
#     whitespace (braceless $NAME inside a word is left alone, as systemd does);
#   * Type=, Restart=, RestartSec=, StartLimitIntervalSec=, StartLimitBurst=,
#     WorkingDirectory=, Environment=.

function fail(msg) {
	printf("%s: %s\n", unit, msg) > "/dev/stderr"
	failed = 1
	exit 2
}

function put(name, value,    f) {
	f = out "/" name
	printf("%s", value) > f
	close(f)
}

function note(msg,    f) {
	f = out "/notes"
	print msg >> f
	close(f)
}

# systemd time span -> milliseconds ("5", "5s", "100ms", "1min 30s", "infinity")
function span_ms(v,    total, num, u, m) {
	if (v == "infinity") return -1
	total = 0
	gsub(/[ \t]+/, " ", v)
	while (v != "") {
		sub(/^ /, "", v)
		if (v == "") break
		if (!match(v, /^[0-9]+(\.[0-9]+)?/)) fail("bad time span: " v)
		num = substr(v, 1, RLENGTH) + 0
		v = substr(v, RLENGTH + 1)
		sub(/^ /, "", v)
		u = ""
		if (match(v, /^[a-z]+/)) { u = substr(v, 1, RLENGTH); v = substr(v, RLENGTH + 1) }
		if (u == "" || u ~ /^(s|sec|second|seconds)$/) m = 1000
		else if (u ~ /^(ms|msec)$/) m = 1
		else if (u ~ /^(us|usec)$/) m = 0.001
		else if (u ~ /^(m|min|minute|minutes)$/) m = 60000
		else if (u ~ /^(h|hr|hour|hours)$/) m = 3600000
		else if (u ~ /^(d|day|days)$/) m = 86400000
		else fail("unknown time unit '" u "'")
		total += num * m
	}
	return int(total)
}

function specifiers(s,    r, c, i, n, v) {
	r = ""
	n = length(s)
	for (i = 1; i <= n; i++) {
		c = substr(s, i, 1)
		if (c != "%") { r = r c; continue }
		i++
		c = substr(s, i, 1)
		if (c == "%") v = "%"
		else if (c == "n") v = unit
		else if (c == "N") v = uname_noext
		else if (c == "p") v = uprefix
		else if (c == "i" || c == "I") v = uinstance
		else if (c == "j") { v = uname_noext; sub(/^.*-/, "", v) }
		else if (c == "t") v = "/run"
		else if (c == "S") v = "/var/lib"
		else if (c == "C") v = "/var/cache"
		else if (c == "L") v = "/var/log"
		else if (c == "E") v = "/etc"
		else if (c == "T") v = "/tmp"
		else if (c == "V") v = "/var/tmp"
		else if (c == "h") v = "/root"
		else if (c == "u" || c == "g") v = "root"
		else if (c == "U" || c == "G") v = "0"
		else fail("specifier %" c " is not emulated by the stand-in")
		r = r v
	}
	return r
}

function hexval(h,    i, v) {
	v = 0
	h = tolower(h)
	for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", substr(h, i, 1)) - 1
	return v
}

# Split a command line into WORDS[1..NWORDS] with systemd's rules.
function split_words(s,    n, i, c, e, w, inword, q, o) {
	NWORDS = 0
	n = length(s)
	i = 1
	while (1) {
		while (i <= n && substr(s, i, 1) ~ /[ \t]/) i++
		if (i > n) break
		w = ""; q = ""
		while (i <= n) {
			c = substr(s, i, 1)
			if (q == "" && c ~ /[ \t]/) break
			if (q == "" && (c == "\"" || c == "'")) { q = c; i++; continue }
			if (q != "" && c == q) { q = ""; i++; continue }
			if (c == "\\") {
				i++
				e = substr(s, i, 1)
				if (e == "") fail("trailing backslash in command line")
				else if (e == "a") w = w "\007"
				else if (e == "b") w = w "\010"
				else if (e == "f") w = w "\014"
				else if (e == "n") w = w "\n"
				else if (e == "r") w = w "\r"
				else if (e == "t") w = w "\t"
				else if (e == "v") w = w "\013"
				else if (e == "s") w = w " "
				else if (e == "\\" || e == "\"" || e == "'") w = w e
				else if (e == "x" && substr(s, i + 1, 2) ~ /^[0-9a-fA-F][0-9a-fA-F]$/) {
					o = hexval(substr(s, i + 1, 2))
					if (o == 0) fail("\\x00 in command line")
					w = w sprintf("%c", o); i += 2
				} else if (e ~ /[0-7]/ && substr(s, i, 3) ~ /^[0-7][0-7][0-7]$/) {
					o = (substr(s, i, 1) * 64) + (substr(s, i + 1, 1) * 8) + substr(s, i + 2, 1)
					if (o == 0) fail("\\000 in command line")
					w = w sprintf("%c", o); i += 2
				} else fail("invalid escape \\" e " in command line")
				i++
				continue
			}
			w = w c
			i++
		}
		if (q != "") fail("unbalanced quotes in command line")
		WORDS[++NWORDS] = w
	}
}

function envget(name,    k) {
	for (k = nenv; k >= 1; k--)
		if (index(ENVS[k], name "=") == 1) return substr(ENVS[k], length(name) + 2)
	if (name == "PATH") return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	return ""
}

# "$$" -> "$", "${NAME}" -> value
function expand_word(w,    r, n, i, c, j, name) {
	r = ""
	n = length(w)
	for (i = 1; i <= n; i++) {
		c = substr(w, i, 1)
		if (c == "$" && substr(w, i + 1, 1) == "$") { r = r "$"; i++; continue }
		if (c == "$" && substr(w, i + 1, 1) == "{") {
			j = index(substr(w, i + 2), "}")
			if (j > 0) {
				name = substr(w, i + 2, j - 1)
				r = r envget(name)
				i = i + 1 + j
				continue
			}
		}
		r = r c
	}
	return r
}

function emit_command(kind, raw,    flags, c, k, n, argc, w, parts, np, m) {
	raw = specifiers(raw)
	sub(/^[ \t]+/, "", raw)
	flags = ""
	while (raw != "") {
		c = substr(raw, 1, 1)
		if (c !~ /[-@:+!]/) break
		flags = flags c
		raw = substr(raw, 2)
	}
	if (index(flags, "@")) fail("the @ prefix (custom argv[0]) is not emulated")
	split_words(raw)
	if (NWORDS == 0) fail(kind " command line is empty")
	n = ++NCMD[kind]
	put(kind "." n ".flags", flags)
	argc = 0
	for (k = 1; k <= NWORDS; k++) {
		w = WORDS[k]
		if (!index(flags, ":") && k > 1 && w ~ /^\$[^{$]/) {
			np = split(envget(substr(w, 2)), parts, /[ \t\n]+/)
			for (m = 1; m <= np; m++) if (parts[m] != "") put(sprintf("%s.%d.%03d", kind, n, ++argc), parts[m])
			continue
		}
		if (!index(flags, ":")) w = expand_word(w)
		put(sprintf("%s.%d.%03d", kind, n, ++argc), w)
	}
}

function directive(sect, key, val,    k, np) {
	if (sect == "Unit") {
		if (key == "StartLimitIntervalSec" || key == "StartLimitInterval") { limit_interval = span_ms(val); return }
		if (key == "StartLimitBurst") { limit_burst = val + 0; return }
		if (key ~ /^(Description|Documentation|After|Before|Wants|Requires|WantedBy|PartOf|BindsTo|Conflicts|ConditionPathExists|DefaultDependencies)$/) {
			if (key ~ /^(After|Before|Requires|BindsTo|Conflicts|ConditionPathExists)$/) note("[Unit] " key "=" val " is not evaluated (ordering/conditions are not emulated)")
			return
		}
		note("[Unit] " key "= is not emulated")
		return
	}
	if (sect == "Install") return
	if (sect != "Service") { note("[" sect "] section is not emulated"); return }
	if (key == "ExecStart") {
		if (val == "") { nstart = 0; return }
		STARTS[++nstart] = val; return
	}
	if (key == "ExecStartPre") {
		if (val == "") { npre = 0; return }
		PRES[++npre] = val; return
	}
	if (key == "Environment") {
		val = specifiers(val)
		split_words(val)
		for (k = 1; k <= NWORDS; k++) {
			if (WORDS[k] !~ /^[A-Za-z_][A-Za-z0-9_]*=/) fail("invalid Environment= assignment: " WORDS[k])
			ENVS[++nenv] = WORDS[k]
		}
		return
	}
	if (key == "Type") { type = val; return }
	if (key == "Restart") {
		if (val !~ /^(no|on-success|on-failure|on-abnormal|on-watchdog|on-abort|always)$/) fail("invalid Restart=" val)
		restart = val; return
	}
	if (key == "RestartSec") { restart_ms = span_ms(val); return }
	if (key == "WorkingDirectory") { workdir = specifiers(val); return }
	if (key == "RemainAfterExit" || key == "TimeoutStartSec" || key == "TimeoutStopSec" || key == "KillMode" || key == "StandardOutput" || key == "StandardError" || key == "SyslogIdentifier") return
	if (key == "User" || key == "Group") {
		if (val != "root" && val != "0") note("[Service] " key "=" val " is ignored: the stand-in runs every unit as root")
		return
	}
	note("[Service] " key "= is not emulated")
}

BEGIN {
	if (unit == "" || out == "") { print "usage: awk -v unit=NAME -v out=DIR -f unit.awk FILE..." > "/dev/stderr"; exit 2 }
	uname_noext = unit; sub(/\.[a-z]+$/, "", uname_noext)
	uprefix = uname_noext; sub(/@.*/, "", uprefix)
	uinstance = ""
	if (index(uname_noext, "@")) { uinstance = uname_noext; sub(/^[^@]*@/, "", uinstance) }
	type = "simple"; restart = "no"; restart_ms = 100
	limit_interval = 10000; limit_burst = 5; workdir = ""
	nstart = 0; npre = 0; nenv = 0; failed = 0
	sect = ""; pending = ""
}

FNR == 1 { sect = ""; pending = "" }

{
	sub(/\r$/, "")
	line = $0
	if (pending == "" && line ~ /^[ \t]*[#;]/) next
	if (line ~ /\\$/) { pending = pending substr(line, 1, length(line) - 1) " "; next }
	line = pending line
	pending = ""
	sub(/^[ \t]+/, "", line); sub(/[ \t]+$/, "", line)
	if (line == "") next
	if (line ~ /^\[.*\]$/) { sect = substr(line, 2, length(line) - 2); next }
	eq = index(line, "=")
	if (eq == 0) { note("unparsable line ignored: " line); next }
	key = substr(line, 1, eq - 1); sub(/[ \t]+$/, "", key)
	val = substr(line, eq + 1); sub(/^[ \t]+/, "", val)
	directive(sect, key, val)
}

END {
	if (failed) exit 2
	if (nstart == 0) fail("Service has no ExecStart= setting, refusing")
	if (nstart > 1 && type != "oneshot") fail("Service has more than one ExecStart= setting, which is only allowed for Type=oneshot services. Refusing.")
	if (type ~ /^(forking|dbus|notify|notify-reload|idle)$/) note("[Service] Type=" type " is run like Type=simple")
	for (i = 1; i <= nenv; i++) put(sprintf("env.%03d", i), ENVS[i])
	for (i = 1; i <= npre; i++) emit_command("pre", PRES[i])
	for (i = 1; i <= nstart; i++) emit_command("start", STARTS[i])
	put("type", type); put("restart", restart); put("restart_ms", restart_ms)
	put("limit_interval_ms", limit_interval); put("limit_burst", limit_burst)
	put("workdir", workdir)
	printf("pre=%d start=%d\n", npre, nstart)
}
