package org.edgekit.demo

import java.io.File
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One bundle on ExecuTorch's stock multimodal runner (the AAR's LlmModule). Each answer resets
 * the KV cache and prefills the whole conversation, as edgekit's ExecuTorch chat does, so every
 * turn is built from the manifest's pieces the same way.
 */
class Engine private constructor(val dir: File, val manifest: BundleManifest) : AutoCloseable {
    private val program = File(dir, manifest.program).path
    private val llm = LlmModule(LlmModule.MODEL_TYPE_MULTIMODAL, program, File(dir, "tokenizer.json").path, 0.0f)
    // Only the audio_preprocessor method is loaded from it; the file is mapped, not copied.
    private val preprocessor: Module? = manifest.audio?.let { Module.load(program, Module.LOAD_MODE_MMAP) }

    init {
        llm.load()
    }

    /** 16 kHz mono samples -> the clip's real log-mel frames, bins first, via the .pte's audio_preprocessor. */
    fun audioPart(samples: FloatArray): Part.Audio {
        val audio = manifest.audio ?: throw BundleException("this bundle has no audio encoder")
        val module = preprocessor ?: throw BundleException("this bundle has no audio preprocessor")
        if (samples.size < audio.minSamples) throw IllegalArgumentException("the recording is too short to hear anything")
        if (samples.size > audio.maxSamples) {
            throw IllegalArgumentException("the recording is longer than ${audio.maxSamples / audio.samplingRate} s; record less")
        }
        val multiple = audio.padToMultipleOf
        val padded = samples.copyOf((samples.size + multiple - 1) / multiple * multiple)
        val out = module.execute("audio_preprocessor",
            EValue.from(Tensor.fromBlob(padded, longArrayOf(padded.size.toLong()))),
            EValue.from(Tensor.fromBlob(longArrayOf(samples.size.toLong()), longArrayOf(1))))
        val features = out[0].toTensor().dataAsFloatArray // [1, T, bins]
        val frames = realMelFrames(samples.size, audio)
        val bins = audio.featureSize
        val chw = FloatArray(bins * frames)
        for (t in 0 until frames) for (b in 0 until bins) chw[b * frames + t] = features[t * bins + b]
        return Part.Audio(chw, bins, frames)
    }

    /**
     * Prefills [turns] and streams the answer to [onPiece]; returns the runner's stats JSON.
     * The runner's errors (a prompt past the context, a piece past prefill_chunk) are thrown.
     */
    fun answer(turns: List<Turn>, onPiece: (String) -> Unit): JSONObject? {
        val segments = promptSegments(manifest.prompt!!, turns)
        llm.resetContext()
        for (part in segments.dropLast(1)) {
            when (part) {
                is Part.Text -> llm.prefillPrompt(part.text)
                is Part.Image -> llm.prefillImages(part.chw, part.width, part.height, 3)
                is Part.Audio -> llm.prefillAudio(part.features, 1, part.bins, part.frames)
            }
        }
        var error: String? = null
        // The last segment is the generation prompt, text: the runner refuses an empty generate().
        val last = (segments.last() as Part.Text).text
        llm.generate(last, manifest.maxContext, object : LlmCallback {
            override fun onResult(result: String) = onPiece(result)
            override fun onStats(stats: String) {
                statsJson = runCatching { JSONObject(stats) }.getOrNull()
            }
            override fun onError(errorCode: Int, message: String) {
                error = "$message (code $errorCode)"
            }
        }, false)
        error?.let { throw IllegalStateException(it) }
        return statsJson
    }

    @Volatile private var statsJson: JSONObject? = null

    fun stop() = llm.stop()

    override fun close() {
        llm.close()
        preprocessor?.destroy()
    }

    companion object {
        /** Reads and checks the bundle (target, file sizes, sha256 when [hash]) before loading anything. */
        fun open(dir: File, format: String, devices: Collection<String>, hash: Boolean): Engine {
            val manifest = BundleManifest.read(dir)
            manifest.checkTarget(format, devices)
            manifest.checkFiles(dir, hash)
            return Engine(dir, manifest)
        }
    }
}
