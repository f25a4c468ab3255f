# What the bench scripts share (bench-at-size.sh, bench-builds.sh): source it after
# setting `kms` to the binary whose `kms bench` drives the servers.

# Waits (up to a minute) until a server's LOG says it is listening.
wait_listening() { # LOG
  for _ in $(seq 300); do
    grep -q "listening" "$1" 2>/dev/null && break
    sleep 0.2
  done
}

# Fills INSTANCE with KEYS generated root keys through the server CLIENT names.
preload() { # KEYS INSTANCE CLIENT...
  "$kms" bench "${@:3}" --instance "$2" --preload "$1" --scenarios count \
    --rounds 1 --seconds 1 --warmup-seconds 0 --concurrency 1 >/dev/null
}

# Medians over alternating rounds. FILE holds `kms bench` table rows, each prefixed by
# its side's name and a space; prints, for each scenario, the median ops/s of side
# FIRST and side SECOND, FIRST as a percentage of SECOND, and their server CPU per call.
round_medians() { # FILE FIRST SECOND FIRST_LABEL SECOND_LABEL
  awk -F'|' -v first="$2" -v second="$3" -v first_label="$4" -v second_label="$5" '
    { side = substr($1, 1, index($1, " ") - 1); name = $2; gsub(/^ +| +$/, "", name)
      n[side, name]++; ops[side, name, n[side, name]] = $3; cpu[side, name, n[side, name]] = $8 + 0
      names[name] = 1; if (n[side, name] > rounds) rounds = n[side, name] }
    function median(a, s, k, c,   i, j, t, v) {
      c = n[s, k]; for (i = 1; i <= c; i++) v[i] = a[s, k, i] + 0
      for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
    END {
      print "| median of " rounds " rounds | " first_label " ops/s | " second_label " ops/s | " \
        first_label " / " second_label " | server CPU/call " first_label " / " second_label " |"
      print "|---|---:|---:|---:|---:|"
      for (k in names) printf "| %s | %.0f | %.0f | %.0f%% | %.0f / %.0f µs |\n", k,
        median(ops, first, k), median(ops, second, k), 100 * median(ops, first, k) / median(ops, second, k),
        median(cpu, first, k), median(cpu, second, k)
    }' "$1"
}
