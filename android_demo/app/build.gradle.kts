plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
}

// The bundle contract from gradle.properties, so the Kotlin holds no device names.
fun quoted(key: String): String = "\"" + providers.gradleProperty(key).get() + "\""

android {
    namespace = "org.edgekit.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.edgekit.demo"
        minSdk = 23 // executorch-android's own minSdk (extension/android/executorch_android/build.gradle)
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a") } // the Android profiles are arm64
        buildConfigField("String", "BUNDLE_FORMAT", quoted("edgekit.format"))
        buildConfigField("String", "BUNDLE_DEVICES", quoted("edgekit.devices"))
    }

    buildFeatures {
        compose = true
        buildConfig = true
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation(libs.executorch.android)
    implementation(platform(libs.compose.bom))
    implementation(libs.compose.material3)
    implementation(libs.compose.ui)
    implementation(libs.activity.compose)
    implementation(libs.lifecycle.viewmodel.compose)
    implementation(libs.core.ktx)
}
