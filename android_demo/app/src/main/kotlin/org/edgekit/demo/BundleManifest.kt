package org.edgekit.demo

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest
import org.json.JSONException
import org.json.JSONObject

/** A bundle the app refuses; the message is one line for the screen. */
class BundleException(message: String) : Exception(message)

class BundleFile(val path: String, val size: Long, val sha256: String)

/** manifest.json's prompt pieces (edgekit/manifest.py PromptPieces). */
class PromptPieces(
    val begin: String, val userStart: String, val userEnd: String, val modelStart: String,
    val modelEnd: String, val generationPrompt: String, val imageStart: String, val imageEnd: String,
    val audioStart: String, val audioEnd: String
)

/** image_preprocessing: an image becomes (h / patch) * (w / patch) / pooling^2 soft tokens. */
class ImageSettings(val patchSize: Int, val poolingKernelSize: Int, val maxSoftTokens: Int)

/**
 * audio_preprocessing, and the clip lengths the .pte's audio_preprocessor method takes (its
 * manifest entry's extra: min_samples, max_samples, pad_to_multiple_of).
 */
class AudioSettings(
    val samplingRate: Int, val featureSize: Int, val frameLength: Int, val hopLength: Int,
    val minSamples: Int, val maxSamples: Int, val padToMultipleOf: Int
)

/**
 * The fields of a bundle's manifest.json this app reads (schema: edgekit/manifest.schema.json).
 * Unknown keys are ignored, as edgekit's own reader does.
 */
class BundleManifest(
    val schemaVersion: Int,
    val device: String,
    val format: String,
    val maxContext: Int,
    val prefillChunk: Int,
    val eosIds: List<Int>,
    val program: String,
    val programData: String?,
    val files: List<BundleFile>,
    val prompt: PromptPieces?,
    val image: ImageSettings?,
    val audio: AudioSettings?
) {
    /**
     * What edgekit.manifest_checks.check_app_target refuses, in its order and words: another
     * format or device, weights in a data file (the AAR's multimodal LlmModule passes none),
     * no prompt pieces.
     */
    fun checkTarget(format: String, devices: Collection<String>) {
        val first = devices.sorted().first()
        if (this.format != format) {
            throw BundleException("this is a ${this.format} bundle; this app runs $format bundles (export with --device $first)")
        }
        if (device !in devices) {
            throw BundleException("this bundle was exported for $device; this app takes bundles for " +
                "${devices.sorted().joinToString(", ")} (export again with --device $first)")
        }
        if (!programData.isNullOrEmpty()) {
            throw BundleException("this bundle keeps its weights in $programData (--external-weights), which this " +
                "app's runtime cannot load; export again without --external-weights")
        }
        if (prompt == null) {
            throw BundleException("this bundle's manifest has no prompt pieces (an older edgekit, or a chat " +
                "template they cannot describe); export it again")
        }
    }

    /** Every listed file is there at its size; with [hash], its sha256 too (seconds per GB). */
    fun checkFiles(dir: File, hash: Boolean) {
        for (entry in files) {
            val file = File(dir, entry.path)
            if (!file.isFile) throw BundleException("bundle file ${entry.path} is missing")
            if (file.length() != entry.size) {
                throw BundleException("bundle file ${entry.path} is ${file.length()} bytes, the manifest says " +
                    "${entry.size}: copy the bundle again")
            }
            if (hash && sha256(file) != entry.sha256) {
                throw BundleException("bundle file ${entry.path} does not match the manifest's sha256: copy the bundle again")
            }
        }
    }

    companion object {
        const val MANIFEST_FILE = "manifest.json"
        const val SCHEMA_VERSION = 2 // edgekit/manifest.py SCHEMA_VERSION

        /** Reads and parses NAME.edgekit/manifest.json; every failure is one BundleException. */
        fun read(dir: File): BundleManifest {
            val file = File(dir, MANIFEST_FILE)
            if (!file.isFile) throw BundleException("$dir is not an edgekit bundle: it has no $MANIFEST_FILE")
            return try {
                parse(JSONObject(file.readText()))
            } catch (e: JSONException) {
                throw BundleException("bundle manifest is not valid: ${e.message}")
            }
        }

        fun parse(json: JSONObject): BundleManifest {
            val version = json.getInt("schema_version")
            if (version > SCHEMA_VERSION) {
                throw BundleException("bundle manifest schema $version is newer than this app understands ($SCHEMA_VERSION); update the app")
            }
            if (version < SCHEMA_VERSION) {
                throw BundleException("bundle manifest schema $version is older than this app reads ($SCHEMA_VERSION); export the bundle again")
            }
            val extra = json.optJSONObject("extra") ?: JSONObject()
            val eos = json.getJSONObject("special_tokens").getJSONArray("eos_ids")
            val files = json.getJSONArray("files")
            val prompt = json.optJSONObject("prompt")
            val image = json.optJSONObject("image_preprocessing")
            val audio = json.optJSONObject("audio_preprocessing")
            val methods = json.getJSONArray("methods")
            val preprocessor = (0 until methods.length()).map { methods.getJSONObject(it) }
                .firstOrNull { it.getString("name") == "audio_preprocessor" }?.optJSONObject("extra")
            return BundleManifest(
                schemaVersion = version,
                device = json.getString("device"),
                format = json.getString("format"),
                maxContext = json.getInt("max_context"),
                prefillChunk = json.getInt("prefill_chunk"),
                eosIds = (0 until eos.length()).map { eos.getInt(it) },
                program = extra.optString("program", "model.pte"),
                programData = if (extra.isNull("program_data")) null else extra.getString("program_data"),
                files = (0 until files.length()).map {
                    val f = files.getJSONObject(it)
                    BundleFile(f.getString("path"), f.getLong("size"), f.getString("sha256"))
                },
                prompt = prompt?.let {
                    PromptPieces(it.getString("begin"), it.getString("user_start"), it.getString("user_end"),
                        it.getString("model_start"), it.getString("model_end"), it.getString("generation_prompt"),
                        it.getString("image_start"), it.getString("image_end"), it.getString("audio_start"),
                        it.getString("audio_end"))
                },
                image = image?.let {
                    ImageSettings(it.getInt("patch_size"), it.getInt("pooling_kernel_size"), it.getInt("max_soft_tokens"))
                },
                audio = if (audio == null || preprocessor == null) null else
                    AudioSettings(audio.getInt("sampling_rate"), audio.getInt("feature_size"),
                        audio.getInt("frame_length"), audio.getInt("hop_length"), preprocessor.getInt("min_samples"),
                        preprocessor.getInt("max_samples"), preprocessor.getInt("pad_to_multiple_of"))
            )
        }

        private fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            FileInputStream(file).use { input ->
                val buffer = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                }
            }
            return digest.digest().joinToString("") { "%02x".format(it) }
        }
    }
}
