#!/bin/sh
# Fashion-MNIST's four idx .gz files for protege's `fashion-mnist` data source (`make data`).
#
# Nothing to do when the Debian package's folder or protege's cache already holds them. Otherwise:
#   1. apt-get download dataset-fashion-mnist (Debian/Ubuntu, MIT licence) in a temp folder and
#      unpack it with dpkg-deb -x into the cache, $PROTEGE_CACHE/fashion-mnist (by default
#      ~/.cache/protege/fashion-mnist): no root needed. If apt's package lists do not know the
#      package, `apt-get update -qq` is tried once (it needs root) and the download again;
#   2. as root, apt-get install -y dataset-fashion-mnist (into /usr/share/datasets/fashion-mnist).
# Exits 1 with a message saying what to do when neither works (the Makefile goes on: the tests
# that need the files skip, saying so).
set -u

FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
SYSTEM=/usr/share/datasets/fashion-mnist
CACHE="${PROTEGE_CACHE:-$HOME/.cache/protege}/fashion-mnist"
PACKAGE=dataset-fashion-mnist

have() {
    for f in $FILES; do
        [ -s "$1/$f" ] || return 1
    done
}

for dir in "$SYSTEM" "$CACHE"; do
    if have "$dir"; then
        echo "fashion-mnist: the files are in $dir"
        exit 0
    fi
done

tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT

fetch() {
    rm -rf "$tmp/deb" && mkdir -p "$tmp/deb" || return 1
    (cd "$tmp/deb" && apt-get download -q "$PACKAGE") || return 1
    dpkg-deb -x "$tmp"/deb/"$PACKAGE"_*.deb "$tmp/deb/x" || return 1
    mkdir -p "$CACHE" || return 1
    for f in $FILES; do  # each file appears complete or not at all
        cp "$tmp/deb/x$SYSTEM/$f" "$CACHE/.$f.part" && mv "$CACHE/.$f.part" "$CACHE/$f" || return 1
    done
}

if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    echo "fashion-mnist: apt-get download $PACKAGE, unpacking into $CACHE"
    if fetch; then
        echo "fashion-mnist: the files are in $CACHE"
        exit 0
    fi
    if ! apt-cache show "$PACKAGE" >/dev/null 2>&1; then
        echo "fashion-mnist: apt's package lists do not know $PACKAGE; trying apt-get update -qq once"
        if apt-get update -qq && fetch; then
            echo "fashion-mnist: the files are in $CACHE"
            exit 0
        fi
    fi
    if [ "$(id -u)" = 0 ]; then
        echo "fashion-mnist: apt-get install -y $PACKAGE"
        if apt-get install -y -q "$PACKAGE" && have "$SYSTEM"; then
            echo "fashion-mnist: the files are in $SYSTEM"
            exit 0
        fi
    fi
fi

cat >&2 <<EOF
fashion-mnist: could not get the files; the tests that need them will be skipped.
  Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
  t10k-labels-idx1-ubyte.gz into $CACHE, or:
    sudo apt-get update && sudo apt-get install $PACKAGE      (Debian/Ubuntu)
    or, with internet access, set \`download: true\` in a run's data config (torchvision's downloader).
EOF
exit 1
