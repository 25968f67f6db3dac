# Sourced by the GPU campaign scripts (after they set ONESTEP_HOME). The 87 MB Inception FID network is larger than
# one call to the GPU machine may carry (64 MB), so it travels as two halves (`split -n 2` of default_1.pt into the
# git-ignored .inc_a/ and .inc_b/), one per call to the same warm machine; docs/results.md says how.
INCEPTION=$ONESTEP_HOME/inception/default_1.pt
INCEPTION_SHA1=a16e4d89c0ecbc17a915dd76ea9e41211aa82562

keep_first_half() {  # parts-folder: the first call keeps .inc_a's half on the machine
    mkdir -p "$1" && cp .inc_a/* "$1/"
}
join_inception() {  # parts-folder: the second call adds .inc_b's half, joins them and checks the SHA-1 (exit 3 if not)
    cp .inc_b/* "$1/"
    mkdir -p "$(dirname "$INCEPTION")"
    cat "$1"/part_* > "$INCEPTION"
    echo "$INCEPTION_SHA1  $INCEPTION" | sha1sum -c - || exit 3
}
