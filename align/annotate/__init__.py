"""`align annotate`: a local web page where annotators rank the current policy's samples into ranking files.

RLHF is a loop: sample from the policy, have people rank the samples, train the reward model, optimise, repeat.
TRL, OpenRLHF, LLaMA-Factory and verl all start from a finished preference file; this module closes the loop:

    align annotate add-annotator NAME --dir D          a token for NAME (printed once, stored as its SHA-256)
    align annotate serve --policy REF --prompts F --k 4 --dir D     sample ahead in the background, serve the page
    align annotate export --dir D --to FILE            a validated ranking file for build-preferences / reward

An annotation folder D holds:
    session.json     what is annotated: the policy (path, manifest key), the prompts (path, sha256), K, overlap,
                     the sampling settings and the engine that sampled
    samples.jsonl    one prompt per line with its K distinct responses, appended by the sampler as it goes
    annotators.json  name -> {role, sha256 of the token}
    rankings.jsonl   the judgments, each one line of the ranking-file contract (docs/formats.md)

Design, and why:
- **Sampling runs ahead** in a background thread (vLLM where installed, else transformers `generate`), so the
  page never waits on generation. Response j of prompt i comes from the seed `request_seed(seed, i*K + j)`,
  whatever the batch, so a restarted sampler reproduces what it had not yet written. Identical or empty texts are
  resampled from further seeds: the ranking contract forbids identical responses.
- **Every judgment is durable before it is acknowledged.** It is validated against the ranking contract, then
  appended with one write(2) on an O_APPEND descriptor and fsync'd under a lock; only then does the server
  answer 200. A crash loses at most the judgment being made; a write that fails half-way is cut back and refused.
  A torn last line (a crash inside that write) is cut off by the writer when the folder is next opened, and said;
  readers never modify the log (align/annotate/folder.py).
- **Assignment**: an annotator gets the first prompt they have not judged that still needs judgments (`overlap`
  annotators per prompt, counting the open leases of others). A lease lasts `lease_minutes`: a returning
  annotator sees the prompt they left, and an abandoned prompt goes to someone else.
- **Order**: responses are shown in an order drawn from (annotator, prompt): random across annotators (no
  position bias shared by all), stable on reload.
- **Flags** (unsafe, nonsense) travel in the line's `notes` as `[flag ID: WHAT]`, so the ranking file stays
  exactly the contract that `align data check-rankings` accepts, and `flags_in()` reads them back.
- **The page** (align/resources/annotate/) is static HTML + JS with no external assets. User and model text is
  only ever set with `textContent`, never parsed as markup; a Content-Security-Policy forbids inline script.
  The server binds 127.0.0.1 by default and refuses other Host headers (DNS rebinding).
"""

from align.annotate.commands import (
    _quietly,
    add_arguments,
    count_judgments,
    export,
    open_session,
    run_command,
    serve,
)
from align.annotate.desk import FLAG_RE, Desk, Lease, Refused, flags_in, notes_of
from align.annotate.folder import ANNOTATIONS, FLAGS, NAME, JsonlLog, _cut_torn_tail, _fsync_dir, read_jsonl
from align.annotate.sampler import Prompt, Sampler, read_prompts
from align.annotate.tokens import Tokens, _read_annotators, _token_hash, add_annotator
from align.annotate.web import CSP, RESOURCES, STATIC, make_app

__all__ = [
    "FLAGS",
    "ANNOTATIONS",
    "NAME",
    "JsonlLog",
    "read_jsonl",
    "_cut_torn_tail",
    "_fsync_dir",
    "_token_hash",
    "add_annotator",
    "_read_annotators",
    "Tokens",
    "Prompt",
    "read_prompts",
    "Sampler",
    "notes_of",
    "FLAG_RE",
    "flags_in",
    "Refused",
    "Lease",
    "Desk",
    "RESOURCES",
    "STATIC",
    "CSP",
    "make_app",
    "open_session",
    "serve",
    "_quietly",
    "count_judgments",
    "export",
    "add_arguments",
    "run_command",
]
