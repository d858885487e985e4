"""Write a small, real Gemma-style tokenizer for random-weight checkpoints.

    OUT_DIR/
      tokenizer.json          BPE with byte fallback, SentencePiece-style "▁" spaces
      tokenizer_config.json   GemmaTokenizer, the Gemma 4 special-token roles
      chat_template.jinja     edgekit/models/gemma4/chat_template.jinja, copied

No model hub is reachable, so the vocabulary is trained here, in well under a second,
on the small multilingual corpus below, then laid out in the id space of the target
vocabulary: every special token at the id `SpecialTokenLayout` gives it (for the real
262144 vocabulary, <|image|> at 258880 and so on), all 256 byte tokens <0x00>..<0xFF>
so any text round-trips, and "<unused{N}>" on every id left over, as in Google's
vocabulary. The pipeline (normalizer, pre-tokenizer, decoder, post-processor) is the
one transformers' GemmaTokenizer builds for itself when it loads the file
(transformers/models/gemma/tokenization_gemma.py), so the `tokenizers` library on a
device and transformers on the host give the same ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgekit.models.gemma4.special_tokens import TOKEN_STRINGS, SpecialTokenLayout

CHAT_TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "models" / "gemma4" / "chat_template.jinja"

# The trained part of the vocabulary stays small: it only has to make the tokenizer
# behave like a real one (multi-character pieces, several scripts); bytes cover the rest.
_MAX_TRAINED_TOKENS = 3000
# Ids kept free of trained pieces in small vocabularies, so some "<unused{N}>" remain
# there too, as in the released vocabulary.
_UNUSED_MARGIN = 64
_SPACE = "▁"  # U+2581, SentencePiece's visible space
# transformers writes this for "no limit" (VERY_LARGE_INTEGER); the released
# tokenizer_config.json carries it too.
_NO_MAX_LENGTH = int(1e30)
# Roles transformers reads from `extra_special_tokens` (google/gemma-4-e2b-it
# tokenizer_config.json; transformers' convert_gemma4_weights.py passes the same dict).
# <|video|> is not among them in the release: Gemma4Processor registers it itself.
_EXTRA_SPECIAL_ROLES = (
    "image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token",
    "sot_token", "eot_token", "soc_token", "eoc_token", "think_token", "escape_token",
    "str_token", "etr_token", "stc_token", "etc_token", "std_token", "etd_token",
)

# --- corpus ---------------------------------------------------------------------------
# Parallel sentences (the demo is speech translation) plus a little English prose.
# Changing this text changes every tokenizer written: checkpoints written before and
# after will not share token ids.
_CORPUS = (
    """Good morning. Where is the train station?
The train to the airport leaves in ten minutes from platform three.
Could you speak a little more slowly, please? I am still learning.
How much does this cost? I would like to pay by card.
The weather is beautiful today, so we are going to walk along the river.
Thank you very much for your help. Have a nice day!
I am looking for a pharmacy that is open on Sunday.
Please translate this sentence into Japanese, Spanish, German and French.
My phone has no signal here, but the translation still works offline.
The museum opens at nine in the morning and closes at six in the evening.
We would like a table for four people near the window.
Excuse me, is this seat taken? No, please sit down.""",
    """Speech translation turns what one person says into words that another person
understands. A small model running on a phone or a single-board computer listens to the
microphone, finds where speech starts and stops, and writes the translation on the
screen. Because nothing leaves the device, it works on a plane, in the mountains, and in
places where the network is slow or expensive. The model reads sound as a sequence of
short frames, turns them into features, and predicts one word piece after another.""",
    """おはようございます。駅はどこですか？
空港行きの電車は三番線から十分後に出発します。
もう少しゆっくり話していただけますか？まだ勉強中です。
これはいくらですか？カードで払いたいです。
今日は天気がいいので、川沿いを散歩します。
手伝ってくれてありがとうございます。良い一日を！
日曜日に開いている薬局を探しています。
この文を日本語、スペイン語、ドイツ語、フランス語に翻訳してください。
ここでは電話の電波がありませんが、翻訳はオフラインでも使えます。
博物館は朝九時に開いて、夕方六時に閉まります。
窓の近くの四人用のテーブルをお願いします。
すみません、この席は空いていますか？いいえ、どうぞ座ってください。""",
    """Buenos días. ¿Dónde está la estación de tren?
El tren al aeropuerto sale en diez minutos desde el andén tres.
¿Podría hablar un poco más despacio, por favor? Todavía estoy aprendiendo.
¿Cuánto cuesta esto? Me gustaría pagar con tarjeta.
Hoy hace un tiempo precioso, así que vamos a caminar junto al río.
Muchas gracias por su ayuda. ¡Que tenga un buen día!
Estoy buscando una farmacia que esté abierta el domingo.
Por favor, traduzca esta frase al japonés, al español, al alemán y al francés.
Mi teléfono no tiene señal aquí, pero la traducción funciona sin conexión.
El museo abre a las nueve de la mañana y cierra a las seis de la tarde.
Queremos una mesa para cuatro personas cerca de la ventana.
Perdone, ¿está ocupado este asiento? No, siéntese, por favor.""",
    """Guten Morgen. Wo ist der Bahnhof?
Der Zug zum Flughafen fährt in zehn Minuten von Gleis drei ab.
Könnten Sie bitte etwas langsamer sprechen? Ich lerne noch.
Wie viel kostet das? Ich möchte mit Karte bezahlen.
Heute ist das Wetter schön, deshalb gehen wir am Fluss spazieren.
Vielen Dank für Ihre Hilfe. Einen schönen Tag noch!
Ich suche eine Apotheke, die am Sonntag geöffnet hat.
Bitte übersetzen Sie diesen Satz ins Japanische, Spanische, Deutsche und Französische.
Mein Telefon hat hier keinen Empfang, aber die Übersetzung funktioniert auch offline.
Das Museum öffnet um neun Uhr morgens und schließt um sechs Uhr abends.
Wir hätten gern einen Tisch für vier Personen am Fenster.
Entschuldigung, ist dieser Platz frei? Nein, setzen Sie sich bitte.""",
    """Bonjour. Où est la gare ?
Le train pour l'aéroport part dans dix minutes du quai numéro trois.
Pourriez-vous parler un peu plus lentement, s'il vous plaît ? J'apprends encore.
Combien ça coûte ? Je voudrais payer par carte.
Il fait très beau aujourd'hui, alors nous allons nous promener le long de la rivière.
Merci beaucoup pour votre aide. Bonne journée !
Je cherche une pharmacie ouverte le dimanche.
Veuillez traduire cette phrase en japonais, en espagnol, en allemand et en français.
Mon téléphone n'a pas de réseau ici, mais la traduction fonctionne hors ligne.
Le musée ouvre à neuf heures du matin et ferme à six heures du soir.
Nous voudrions une table pour quatre personnes près de la fenêtre.
Excusez-moi, cette place est-elle libre ? Non, asseyez-vous, je vous en prie.""",
)


# --- training -------------------------------------------------------------------------
def _train_pieces(max_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces (in training order) and merges learned from `_CORPUS`.

    Trained word by word (Metaspace split, "▁" prefixed to every word but the first), so
    no merge spans two words: applying the merges to a whole unsplit sentence, as
    Gemma's pipeline does, gives the same pieces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=max_tokens,
        min_frequency=2,
        limit_alphabet=max(1, max_tokens // 2),
        initial_alphabet=["\n"],  # the chat template's turn separator, one token as in Gemma's vocab
        special_tokens=[],
        show_progress=False,
    )
    lines = [line for paragraph in _CORPUS for line in paragraph.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = [piece for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])][:max_tokens]
    kept = set(pieces)
    merges = []
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if left in kept and right in kept and left + right in kept:
            merges.append((left, right))
    return pieces, merges


# --- layout ---------------------------------------------------------------------------
def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def build_vocab(layout: SpecialTokenLayout) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The full vocabulary (token -> id, exactly `layout.vocab_size` entries) and merges.

    Special tokens sit at their layout ids; the free ids take, in order, the 256 byte
    tokens, the trained pieces, then "<unused0>", "<unused1>", ...
    """
    reserved = {i: TOKEN_STRINGS[role] for role, i in layout.ids.items()}
    if len(reserved) != len(layout.ids) or set(reserved.values()) != set(TOKEN_STRINGS.values()):
        raise ValueError("the layout must give every special token its own id")
    if max(reserved) >= layout.vocab_size:
        raise ValueError(f"special token id {max(reserved)} is outside a vocabulary of {layout.vocab_size}")
    room = layout.vocab_size - len(reserved) - 256
    if room <= 0:
        raise ValueError(f"vocab_size {layout.vocab_size} leaves no room for the 256 byte tokens")
    pieces, merges = _train_pieces(min(_MAX_TRAINED_TOKENS, max(1, room - _UNUSED_MARGIN)))
    regular = _byte_tokens() + pieces
    clash = set(regular) & set(reserved.values())
    if clash:
        raise ValueError(f"trained pieces collide with special tokens: {sorted(clash)}")

    vocab: dict[str, int] = {token: i for i, token in reserved.items()}
    free = (i for i in range(layout.vocab_size) if i not in reserved)
    for token, i in zip(regular, free):
        vocab[token] = i
    for n, i in enumerate(free):
        vocab[f"<unused{n}>"] = i
    if len(vocab) != layout.vocab_size:
        raise ValueError(f"built {len(vocab)} tokens for a vocabulary of {layout.vocab_size}")
    return vocab, merges


def build_tokenizer(layout: SpecialTokenLayout):
    """A `tokenizers.Tokenizer` with Gemma's pipeline over the vocabulary of `layout`.

        text -> Replace(" ", "▁") -> Split(" ") (a no-op after the replace, kept because
             GemmaTokenizer sets it) -> BPE(byte_fallback) -> "<bos>" $A
        ids  -> Replace("▁", " ") -> ByteFallback -> Fuse
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = build_vocab(layout)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=layout.string("unk_token"),
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Same template transformers builds from add_bos_token=True (TokenizersBackend.update_post_processor).
    bos = layout.string("bos_token")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, layout.id("bos_token"))]
    )
    # Already in the vocabulary, so they keep their ids; registering them makes them
    # match whole in text, never split, and skippable on decode.
    by_id = sorted(layout.ids.items(), key=lambda kv: kv[1])
    tokenizer.add_special_tokens([AddedToken(TOKEN_STRINGS[role], special=True, normalized=False)
                                  for role, _ in by_id])
    return tokenizer


def tokenizer_config(layout: SpecialTokenLayout) -> dict[str, Any]:
    """tokenizer_config.json, shaped like google/gemma-4-e2b-it's."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "backend": "tokenizers",
        "bos_token": layout.string("bos_token"),
        "clean_up_tokenization_spaces": False,
        "eos_token": layout.string("eos_token"),
        "extra_special_tokens": {role: TOKEN_STRINGS[role] for role in _EXTRA_SPECIAL_ROLES},
        "mask_token": layout.string("mask_token"),
        "model_max_length": _NO_MAX_LENGTH,
        "pad_token": layout.string("pad_token"),
        "padding_side": "left",
        "processor_class": "Gemma4Processor",
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": layout.string("unk_token"),
    }


# --- files ----------------------------------------------------------------------------
def write_tokenizer_files(out_dir: Path, *, layout: SpecialTokenLayout) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    Deterministic: the same layout gives byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(layout).save(str(out_dir / "tokenizer.json"), pretty=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(layout), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    shutil.copyfile(CHAT_TEMPLATE_PATH, out_dir / "chat_template.jinja")
