package org.edgekit.demo

import kotlin.math.floor
import kotlin.math.min
import kotlin.math.sqrt

/** One part of a message: text, an image already at its target size, or a clip's log-mel frames. */
sealed class Part {
    class Text(val text: String) : Part()

    /** RGB levels, channels first (3 x height x width), as LlmModule.prefillImages takes them. */
    class Image(val chw: IntArray, val width: Int, val height: Int) : Part()

    /** Real log-mel frames, bins first (bins x frames), as LlmModule.prefillAudio takes them. */
    class Audio(val features: FloatArray, val bins: Int, val frames: Int) : Part()
}

class Turn(val fromUser: Boolean, val parts: List<Part>)

/**
 * A conversation as the stock runner's inputs, in order: text, and each image or clip between its
 * markers. edgekit.runtimes.prompt.prompt_segments does the same in Python, and
 * tests/test_android_native.py checks those inputs give the Python runner's tokens.
 */
fun promptSegments(pieces: PromptPieces, turns: List<Turn>): List<Part> {
    val out = mutableListOf<Part>(Part.Text(pieces.begin))
    for (turn in turns) {
        val parts = joinText(turn.parts).toMutableList()
        // The template trims the turn's rendered content, in which media are placeholders.
        (parts.firstOrNull() as? Part.Text)?.let { parts[0] = Part.Text(it.text.trimStart()) }
        (parts.lastOrNull() as? Part.Text)?.let { parts[parts.size - 1] = Part.Text(it.text.trimEnd()) }
        out.add(Part.Text(if (turn.fromUser) pieces.userStart else pieces.modelStart))
        for (part in parts) {
            when (part) {
                is Part.Text -> out.add(part)
                is Part.Image -> out.addAll(listOf(Part.Text(pieces.imageStart), part, Part.Text(pieces.imageEnd)))
                is Part.Audio -> out.addAll(listOf(Part.Text(pieces.audioStart), part, Part.Text(pieces.audioEnd)))
            }
        }
        out.add(Part.Text(if (turn.fromUser) pieces.userEnd else pieces.modelEnd))
    }
    out.add(Part.Text(pieces.generationPrompt))
    return joinText(out).filter { it !is Part.Text || it.text.isNotEmpty() }
}

private fun joinText(parts: List<Part>): List<Part> {
    val out = mutableListOf<Part>()
    for (part in parts) {
        val last = out.lastOrNull()
        if (part is Part.Text && last is Part.Text) out[out.size - 1] = Part.Text(last.text + part.text) else out.add(part)
    }
    return out
}

/**
 * The (height, width) a photo is resized to: edgekit.runtimes.image_preprocess.target_size, the
 * largest multiples of patch * pooling that keep the aspect ratio within max_soft_tokens.
 */
fun imageTargetSize(height: Int, width: Int, image: ImageSettings): Pair<Int, Int> {
    val p = image.patchSize
    val k = image.poolingKernelSize
    val maxPatches = image.maxSoftTokens * k * k
    val targetPx = maxPatches.toDouble() * p * p
    val factor = sqrt(targetPx / (height.toDouble() * width))
    val side = k * p
    var h = floor(factor * height / side).toInt() * side
    var w = floor(factor * width / side).toInt() * side
    if (h == 0 && w == 0) throw IllegalArgumentException("cannot fit a ${width}x$height image into ${image.maxSoftTokens} soft tokens")
    val maxSide = (maxPatches / (k * k)) * side
    if (h == 0) {
        h = side
        w = min((width / height) * side, maxSide)
    } else if (w == 0) {
        w = side
        h = min((height / width) * side, maxSide)
    }
    if (h.toDouble() * w > targetPx) throw IllegalArgumentException("a ${width}x$height image does not fit ${image.maxSoftTokens} soft tokens")
    return Pair(h, w)
}

/** Soft tokens of an image at its target size. */
fun imageSoftTokens(height: Int, width: Int, image: ImageSettings): Int =
    (height / image.patchSize) * (width / image.patchSize) / (image.poolingKernelSize * image.poolingKernelSize)

/**
 * Real log-mel frames of a clip of [numSamples] samples: edgekit.runtimes.mel_features.num_mel_frames,
 * the prefix of audio_preprocessor's output its mask marks real.
 */
fun realMelFrames(numSamples: Int, audio: AudioSettings): Int =
    maxOf(Math.floorDiv(numSamples + audio.frameLength / 2 - (audio.frameLength + 1), audio.hopLength) + 1, 0)
