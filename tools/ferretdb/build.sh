#!/usr/bin/env bash
# Builds parley-ferretdb (FerretDB v1.24.2, see main.go) into the path given as $1, with three
# changes to FerretDB. First, its SQLite backend's queries compare `_ferretdb_sjson->'$._id'`,
# while the unique index it creates on every collection is on `_ferretdb_sjson->"_id"`, so SQLite
# cannot use that index and every `_id` lookup, update and delete reads the whole table (at
# 20,000 documents: 105 ms for a missing or recent `_id` instead of 1.3 ms). The change makes
# the queries name the indexed expression; the two select the same JSON value.
# The build works on a copy (vendored modules, patched there); the checkout is not modified.
set -euo pipefail
out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here"/go.mod "$here"/go.sum "$here"/main.go "$work"/
cd "$work"
"$go" mod vendor
file=vendor/github.com/FerretDB/FerretDB/internal/backends/sqlite/metadata/metadata.go
grep -q "IDColumn = DefaultColumn + \"->'\$._id'\"" "$file" || {
  echo "build.sh: FerretDB's IDColumn is not what this patch expects; not building" >&2
  exit 1
}
sed -i "s|IDColumn = DefaultColumn + \"->'\$._id'\"|IDColumn = DefaultColumn + \`->\"_id\"\`|" "$file"
# Second change: `{_id: {$in: [...]}}` is answered from the same index (one command reads many
# documents by `_id`), in Query and in Explain (sqlite-id-in.patch, id_where.go.in).
sqlite=vendor/github.com/FerretDB/FerretDB/internal/backends/sqlite
git apply --directory="$sqlite" "$here/sqlite-id-in.patch"
cp "$here/id_where.go.in" "$sqlite/parley_id_where.go"
# Third: an ordered insert that meets a duplicate key in one batch of documents still inserted
# the following batches (the loop over batches did not stop): gaps where Parley writes
# consecutive keys. It now stops there, as MongoDB does (insert-ordered.patch).
git apply --directory=vendor/github.com/FerretDB/FerretDB/internal/handler "$here/insert-ordered.patch"
mkdir -p "$(dirname "$out")"
"$go" build -mod=vendor -o "$out" .
echo "id-index-3" > "$out.build"
