/* moe_vk.c — the Vulkan backend of moe.

   WHAT IT DOES
   Runs the op interface of moe.h's private section (embed, rmsnorm, matmul, rope, attention, add,
   moe_ffn, ...) as compute shaders. The forward pass in moe.c calls the ops between begin_step and
   end_step; here each op only appends dispatch records to the step. end_step turns the records
   into one command buffer (or replays a cached one when the records are identical, as they are
   for every decode step: positions and token ids live in a small host-visible "step" buffer, not
   in the commands), submits it once, waits, and leaves the logits in a host-visible buffer.

   MAP OF THIS FILE
   1. Vulkan declarations: the subset of the API this file uses (no Vulkan headers needed)
   2. loader: dlopen("libvulkan.so.1") and the function table (no global vk* symbols)
   3. backend: instance, validation messenger, device choice, features; or the host's own
      instance, device and queue (moe_vk_handles) and moe_vk_requirements
   4. memory: buffers, batched uploads through staging, weight windows
   5. pipelines: built lazily from the embedded SPIR-V (shaders_embedded.c), through a pipeline
      cache that a host may pass in (checked) and get back
   6. contexts: activations, KV cache, scratch; step recording, barriers, submit, profiling
   7. ops: the op table (moe_vk_ops)

   WEIGHTS
   All weights live in device-local "windows": buffers no larger than maxStorageBufferRange (and
   maxMemoryAllocationSize). A tensor sits inside one window unless it is larger than a window,
   then it is split at row boundaries and each part is a separate dispatch. Dense kernels see
   their tensor at byte 0 of binding 6[0]. Expert tensors are addressed through a per-layer
   indirection table on the GPU (expert id -> window, byte offset; binding 3), with the windows
   of the layer bound as the array binding 6[0..7], so streaming changes the table and never the
   kernels: under a gpu_budget_bytes below the weights, the experts go through the GPU expert
   slot cache (its bannered block before vk_upload_weights).

   ENVIRONMENT
   MOE_VK_VALIDATION=1   enable VK_LAYER_KHRONOS_validation; every message goes to the log
   MOE_VK_PROFILE=1      timestamp every dispatch; the context logs GPU time per kernel kind
                         when it is freed (serializes dispatches: use for attribution only)
   MOE_VK_NO_COOPMAT=1   do not use GL_NV_cooperative_matrix for prefill matmuls
   MOE_VK_SERIAL=1       a barrier between every two dispatches (debugging) */
#define _GNU_SOURCE
#define MOE_INTERNAL
#include "moe.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
/* Win32: the loader is vulkan-1.dll (LoadLibrary / GetProcAddress), the mutexes SRW locks.
   Compiled by make test-mingw (x86_64-w64-mingw32-gcc); not run here. */
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#define RTLD_NOW 0
#define RTLD_LOCAL 0
static void *win_dlopen(const char *name, int flags) {
    (void)flags;
    return (void *)LoadLibraryA(name);
}
static void *win_dlsym(void *lib, const char *name) {
    FARPROC fn = GetProcAddress((HMODULE)lib, name);
    void *p = NULL;
    memcpy(&p, &fn, sizeof p < sizeof fn ? sizeof p : sizeof fn);
    return p;
}
static int win_dlclose(void *lib) { return FreeLibrary((HMODULE)lib) ? 0 : -1; }
#define dlopen win_dlopen
#define dlsym win_dlsym
#define dlclose win_dlclose
typedef SRWLOCK win_mutex;
static int win_mutex_init(win_mutex *m, const void *attr) { (void)attr; InitializeSRWLock(m); return 0; }
static int win_mutex_destroy(win_mutex *m) { (void)m; return 0; }
static int win_mutex_lock(win_mutex *m) { AcquireSRWLockExclusive(m); return 0; }
static int win_mutex_unlock(win_mutex *m) { ReleaseSRWLockExclusive(m); return 0; }
#define pthread_mutex_t win_mutex
#define pthread_mutex_init win_mutex_init
#define pthread_mutex_destroy win_mutex_destroy
#define pthread_mutex_lock win_mutex_lock
#define pthread_mutex_unlock win_mutex_unlock
#define PTHREAD_MUTEX_INITIALIZER SRWLOCK_INIT
#define VK_LOADER_NAMES {"vulkan-1.dll"}
#define VK_LOADER_MISSING "the Vulkan loader vulkan-1.dll was not found (install a GPU driver or the Vulkan runtime)"
#define VK_PID() GetCurrentProcessId()
#define VK_RENAME(from, to) (MoveFileExA(from, to, MOVEFILE_REPLACE_EXISTING) != 0) /* rename() fails over an existing file */
#else
#include <dlfcn.h>
#include <pthread.h>
#ifdef __APPLE__
/* macOS: Vulkan through MoltenVK, with the Khronos loader (the Vulkan SDK or Homebrew's
   vulkan-loader: libvulkan.1.dylib, on the dyld path or in the usual prefixes) or MoltenVK's own
   library as the loader. Its devices are portability devices: see vk_create_instance. Compiled
   here only against Linux headers (no macOS machine): untested. */
#define VK_LOADER_NAMES {"libvulkan.1.dylib", "libvulkan.dylib", "/usr/local/lib/libvulkan.1.dylib", \
                         "/opt/homebrew/lib/libvulkan.1.dylib", "libMoltenVK.dylib"}
#define VK_LOADER_MISSING "the Vulkan loader libvulkan.1.dylib (or libMoltenVK.dylib) was not found (install the Vulkan SDK, or brew install molten-vk vulkan-loader)"
#else
#define VK_LOADER_NAMES {"libvulkan.so.1", "libvulkan.so"}
#define VK_LOADER_MISSING "the Vulkan loader libvulkan.so.1 was not found (Debian: apt-get install libvulkan1)"
#endif
#include <unistd.h>
#define VK_PID() getpid()
#define VK_RENAME(from, to) (rename(from, to) == 0)
#endif

/* ============================================================================================ */
/* 1. Vulkan declarations                                                                        */
/* ============================================================================================ */
/* The subset of vulkan_core.h (Khronos, Apache-2.0 OR MIT) that this file uses, so that it builds
   without the Vulkan SDK. Enums are plain int32_t, flag types VkFlags; layouts are identical. */
#if defined(_WIN32)
#define VKAPI_PTR __stdcall
#elif defined(__ARM_ARCH) && __ARM_ARCH < 7
#define VKAPI_PTR
#elif defined(__ARM_ARCH) && __ARM_ARCH >= 7 && defined(__ARM_32BIT_STATE)
#define VKAPI_PTR __attribute__((pcs("aapcs-vfp")))
#else
#define VKAPI_PTR
#endif
typedef uint32_t VkFlags;
typedef uint32_t VkBool32;
typedef uint64_t VkDeviceSize;
typedef int32_t VkEnum;
typedef int32_t VkResult;
#define VK_DISPATCHABLE(name) typedef struct name##_T *name
#if defined(__LP64__) || defined(_WIN64) || defined(__x86_64__) || defined(__aarch64__) || defined(__powerpc64__)
#define VK_NONDISPATCHABLE(name) typedef struct name##_T *name
#else
#define VK_NONDISPATCHABLE(name) typedef uint64_t name
#endif
VK_DISPATCHABLE(VkInstance);
VK_DISPATCHABLE(VkPhysicalDevice);
VK_DISPATCHABLE(VkDevice);
VK_DISPATCHABLE(VkQueue);
VK_DISPATCHABLE(VkCommandBuffer);
VK_NONDISPATCHABLE(VkBuffer);
VK_NONDISPATCHABLE(VkDeviceMemory);
VK_NONDISPATCHABLE(VkShaderModule);
VK_NONDISPATCHABLE(VkPipeline);
VK_NONDISPATCHABLE(VkPipelineLayout);
VK_NONDISPATCHABLE(VkPipelineCache);
VK_NONDISPATCHABLE(VkDescriptorSetLayout);
VK_NONDISPATCHABLE(VkDescriptorSet);
VK_NONDISPATCHABLE(VkCommandPool);
VK_NONDISPATCHABLE(VkFence);
VK_NONDISPATCHABLE(VkSemaphore);
VK_NONDISPATCHABLE(VkQueryPool);
VK_NONDISPATCHABLE(VkDebugUtilsMessengerEXT);

typedef void (VKAPI_PTR *PFN_vkVoidFunction)(void);
typedef PFN_vkVoidFunction (VKAPI_PTR *PFN_vkGetInstanceProcAddr)(VkInstance, const char *);
struct VkDebugUtilsMessengerCallbackDataEXT;
typedef VkBool32 (VKAPI_PTR *PFN_vkDebugUtilsMessengerCallbackEXT)(VkFlags severity, VkFlags types,
                                                                   const struct VkDebugUtilsMessengerCallbackDataEXT *data, void *user);

typedef struct VkApplicationInfo { VkEnum sType; const void *pNext; const char *pApplicationName; uint32_t applicationVersion; const char *pEngineName; uint32_t engineVersion, apiVersion; } VkApplicationInfo;
typedef struct VkInstanceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; const VkApplicationInfo *pApplicationInfo; uint32_t enabledLayerCount; const char* const *ppEnabledLayerNames; uint32_t enabledExtensionCount; const char* const *ppEnabledExtensionNames; } VkInstanceCreateInfo;
typedef struct VkLayerProperties { char layerName[256]; uint32_t specVersion, implementationVersion; char description[256]; } VkLayerProperties;
typedef struct VkExtensionProperties { char extensionName[256]; uint32_t specVersion; } VkExtensionProperties;
typedef struct VkPhysicalDeviceLimits { uint32_t maxImageDimension1D, maxImageDimension2D, maxImageDimension3D, maxImageDimensionCube, maxImageArrayLayers, maxTexelBufferElements, maxUniformBufferRange, maxStorageBufferRange, maxPushConstantsSize, maxMemoryAllocationCount, maxSamplerAllocationCount; VkDeviceSize bufferImageGranularity, sparseAddressSpaceSize; uint32_t maxBoundDescriptorSets, maxPerStageDescriptorSamplers, maxPerStageDescriptorUniformBuffers, maxPerStageDescriptorStorageBuffers, maxPerStageDescriptorSampledImages, maxPerStageDescriptorStorageImages, maxPerStageDescriptorInputAttachments, maxPerStageResources, maxDescriptorSetSamplers, maxDescriptorSetUniformBuffers, maxDescriptorSetUniformBuffersDynamic, maxDescriptorSetStorageBuffers, maxDescriptorSetStorageBuffersDynamic, maxDescriptorSetSampledImages, maxDescriptorSetStorageImages, maxDescriptorSetInputAttachments, maxVertexInputAttributes, maxVertexInputBindings, maxVertexInputAttributeOffset, maxVertexInputBindingStride, maxVertexOutputComponents, maxTessellationGenerationLevel, maxTessellationPatchSize, maxTessellationControlPerVertexInputComponents, maxTessellationControlPerVertexOutputComponents, maxTessellationControlPerPatchOutputComponents, maxTessellationControlTotalOutputComponents, maxTessellationEvaluationInputComponents, maxTessellationEvaluationOutputComponents, maxGeometryShaderInvocations, maxGeometryInputComponents, maxGeometryOutputComponents, maxGeometryOutputVertices, maxGeometryTotalOutputComponents, maxFragmentInputComponents, maxFragmentOutputAttachments, maxFragmentDualSrcAttachments, maxFragmentCombinedOutputResources, maxComputeSharedMemorySize, maxComputeWorkGroupCount[3], maxComputeWorkGroupInvocations, maxComputeWorkGroupSize[3], subPixelPrecisionBits, subTexelPrecisionBits, mipmapPrecisionBits, maxDrawIndexedIndexValue, maxDrawIndirectCount; float maxSamplerLodBias, maxSamplerAnisotropy; uint32_t maxViewports, maxViewportDimensions[2]; float viewportBoundsRange[2]; uint32_t viewportSubPixelBits; size_t minMemoryMapAlignment; VkDeviceSize minTexelBufferOffsetAlignment, minUniformBufferOffsetAlignment, minStorageBufferOffsetAlignment; int32_t minTexelOffset; uint32_t maxTexelOffset; int32_t minTexelGatherOffset; uint32_t maxTexelGatherOffset; float minInterpolationOffset, maxInterpolationOffset; uint32_t subPixelInterpolationOffsetBits, maxFramebufferWidth, maxFramebufferHeight, maxFramebufferLayers; VkFlags framebufferColorSampleCounts, framebufferDepthSampleCounts, framebufferStencilSampleCounts, framebufferNoAttachmentsSampleCounts; uint32_t maxColorAttachments; VkFlags sampledImageColorSampleCounts, sampledImageIntegerSampleCounts, sampledImageDepthSampleCounts, sampledImageStencilSampleCounts, storageImageSampleCounts; uint32_t maxSampleMaskWords; VkBool32 timestampComputeAndGraphics; float timestampPeriod; uint32_t maxClipDistances, maxCullDistances, maxCombinedClipAndCullDistances, discreteQueuePriorities; float pointSizeRange[2], lineWidthRange[2], pointSizeGranularity, lineWidthGranularity; VkBool32 strictLines, standardSampleLocations; VkDeviceSize optimalBufferCopyOffsetAlignment, optimalBufferCopyRowPitchAlignment, nonCoherentAtomSize; } VkPhysicalDeviceLimits;
typedef struct VkPhysicalDeviceSparseProperties { VkBool32 residencyStandard2DBlockShape, residencyStandard2DMultisampleBlockShape, residencyStandard3DBlockShape, residencyAlignedMipSize, residencyNonResidentStrict; } VkPhysicalDeviceSparseProperties;
typedef struct VkPhysicalDeviceProperties { uint32_t apiVersion, driverVersion, vendorID, deviceID; VkEnum deviceType; char deviceName[256]; uint8_t pipelineCacheUUID[16]; VkPhysicalDeviceLimits limits; VkPhysicalDeviceSparseProperties sparseProperties; } VkPhysicalDeviceProperties;
typedef struct VkPhysicalDeviceProperties2 { VkEnum sType; void *pNext; VkPhysicalDeviceProperties properties; } VkPhysicalDeviceProperties2;
typedef struct VkPhysicalDeviceSubgroupProperties { VkEnum sType; void *pNext; uint32_t subgroupSize; VkFlags supportedStages, supportedOperations; VkBool32 quadOperationsInAllStages; } VkPhysicalDeviceSubgroupProperties;
typedef struct VkPhysicalDevicePushDescriptorPropertiesKHR { VkEnum sType; void *pNext; uint32_t maxPushDescriptors; } VkPhysicalDevicePushDescriptorPropertiesKHR;
typedef struct VkPhysicalDeviceMaintenance3Properties { VkEnum sType; void *pNext; uint32_t maxPerSetDescriptors; VkDeviceSize maxMemoryAllocationSize; } VkPhysicalDeviceMaintenance3Properties;
typedef struct VkPhysicalDeviceFeatures { VkBool32 robustBufferAccess, fullDrawIndexUint32, imageCubeArray, independentBlend, geometryShader, tessellationShader, sampleRateShading, dualSrcBlend, logicOp, multiDrawIndirect, drawIndirectFirstInstance, depthClamp, depthBiasClamp, fillModeNonSolid, depthBounds, wideLines, largePoints, alphaToOne, multiViewport, samplerAnisotropy, textureCompressionETC2, textureCompressionASTC_LDR, textureCompressionBC, occlusionQueryPrecise, pipelineStatisticsQuery, vertexPipelineStoresAndAtomics, fragmentStoresAndAtomics, shaderTessellationAndGeometryPointSize, shaderImageGatherExtended, shaderStorageImageExtendedFormats, shaderStorageImageMultisample, shaderStorageImageReadWithoutFormat, shaderStorageImageWriteWithoutFormat, shaderUniformBufferArrayDynamicIndexing, shaderSampledImageArrayDynamicIndexing, shaderStorageBufferArrayDynamicIndexing, shaderStorageImageArrayDynamicIndexing, shaderClipDistance, shaderCullDistance, shaderFloat64, shaderInt64, shaderInt16, shaderResourceResidency, shaderResourceMinLod, sparseBinding, sparseResidencyBuffer, sparseResidencyImage2D, sparseResidencyImage3D, sparseResidency2Samples, sparseResidency4Samples, sparseResidency8Samples, sparseResidency16Samples, sparseResidencyAliased, variableMultisampleRate, inheritedQueries; } VkPhysicalDeviceFeatures;
typedef struct VkPhysicalDeviceFeatures2 { VkEnum sType; void *pNext; VkPhysicalDeviceFeatures features; } VkPhysicalDeviceFeatures2;
typedef struct VkPhysicalDeviceShaderFloat16Int8Features { VkEnum sType; void *pNext; VkBool32 shaderFloat16, shaderInt8; } VkPhysicalDeviceShaderFloat16Int8Features;
typedef struct VkPhysicalDeviceVulkanMemoryModelFeatures { VkEnum sType; void *pNext; VkBool32 vulkanMemoryModel, vulkanMemoryModelDeviceScope, vulkanMemoryModelAvailabilityVisibilityChains; } VkPhysicalDeviceVulkanMemoryModelFeatures;
typedef struct VkPhysicalDeviceCooperativeMatrixFeaturesNV { VkEnum sType; void *pNext; VkBool32 cooperativeMatrix, cooperativeMatrixRobustBufferAccess; } VkPhysicalDeviceCooperativeMatrixFeaturesNV;
typedef struct VkCooperativeMatrixPropertiesNV { VkEnum sType; void *pNext; uint32_t MSize, NSize, KSize; VkEnum AType, BType, CType, DType, scope; } VkCooperativeMatrixPropertiesNV;
typedef struct VkExtent3D { uint32_t width, height, depth; } VkExtent3D;
typedef struct VkQueueFamilyProperties { VkFlags queueFlags; uint32_t queueCount, timestampValidBits; VkExtent3D minImageTransferGranularity; } VkQueueFamilyProperties;
typedef struct VkMemoryType { VkFlags propertyFlags; uint32_t heapIndex; } VkMemoryType;
typedef struct VkMemoryHeap { VkDeviceSize size; VkFlags flags; } VkMemoryHeap;
typedef struct VkPhysicalDeviceMemoryProperties { uint32_t memoryTypeCount; VkMemoryType memoryTypes[32]; uint32_t memoryHeapCount; VkMemoryHeap memoryHeaps[16]; } VkPhysicalDeviceMemoryProperties;
typedef struct VkDeviceQueueCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueFamilyIndex, queueCount; const float *pQueuePriorities; } VkDeviceQueueCreateInfo;
typedef struct VkDeviceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueCreateInfoCount; const VkDeviceQueueCreateInfo *pQueueCreateInfos; uint32_t enabledLayerCount; const char* const *ppEnabledLayerNames; uint32_t enabledExtensionCount; const char* const *ppEnabledExtensionNames; const VkPhysicalDeviceFeatures *pEnabledFeatures; } VkDeviceCreateInfo;
typedef struct VkBufferCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkDeviceSize size; VkFlags usage; VkEnum sharingMode; uint32_t queueFamilyIndexCount; const uint32_t *pQueueFamilyIndices; } VkBufferCreateInfo;
typedef struct VkMemoryRequirements { VkDeviceSize size, alignment; uint32_t memoryTypeBits; } VkMemoryRequirements;
typedef struct VkMemoryAllocateInfo { VkEnum sType; const void *pNext; VkDeviceSize allocationSize; uint32_t memoryTypeIndex; } VkMemoryAllocateInfo;
typedef struct VkShaderModuleCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; size_t codeSize; const uint32_t *pCode; } VkShaderModuleCreateInfo;
typedef struct VkDescriptorSetLayoutBinding { uint32_t binding; VkEnum descriptorType; uint32_t descriptorCount; VkFlags stageFlags; const void *pImmutableSamplers; } VkDescriptorSetLayoutBinding;
typedef struct VkDescriptorSetLayoutCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t bindingCount; const VkDescriptorSetLayoutBinding *pBindings; } VkDescriptorSetLayoutCreateInfo;
typedef struct VkPushConstantRange { VkFlags stageFlags; uint32_t offset, size; } VkPushConstantRange;
typedef struct VkPipelineLayoutCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t setLayoutCount; const VkDescriptorSetLayout *pSetLayouts; uint32_t pushConstantRangeCount; const VkPushConstantRange *pPushConstantRanges; } VkPipelineLayoutCreateInfo;
typedef struct VkSpecializationMapEntry { uint32_t constantID, offset; size_t size; } VkSpecializationMapEntry;
typedef struct VkSpecializationInfo { uint32_t mapEntryCount; const VkSpecializationMapEntry *pMapEntries; size_t dataSize; const void *pData; } VkSpecializationInfo;
typedef struct VkPipelineShaderStageCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkEnum stage; VkShaderModule module; const char *pName; const VkSpecializationInfo *pSpecializationInfo; } VkPipelineShaderStageCreateInfo;
typedef struct VkComputePipelineCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkPipelineShaderStageCreateInfo stage; VkPipelineLayout layout; VkPipeline basePipelineHandle; int32_t basePipelineIndex; } VkComputePipelineCreateInfo;
typedef struct VkCommandPoolCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; uint32_t queueFamilyIndex; } VkCommandPoolCreateInfo;
typedef struct VkCommandBufferAllocateInfo { VkEnum sType; const void *pNext; VkCommandPool commandPool; VkEnum level; uint32_t commandBufferCount; } VkCommandBufferAllocateInfo;
typedef struct VkCommandBufferBeginInfo { VkEnum sType; const void *pNext; VkFlags flags; const void *pInheritanceInfo; } VkCommandBufferBeginInfo;
typedef struct VkDescriptorBufferInfo { VkBuffer buffer; VkDeviceSize offset, range; } VkDescriptorBufferInfo;
typedef struct VkWriteDescriptorSet { VkEnum sType; const void *pNext; VkDescriptorSet dstSet; uint32_t dstBinding, dstArrayElement, descriptorCount; VkEnum descriptorType; const void *pImageInfo; const VkDescriptorBufferInfo *pBufferInfo; const void *pTexelBufferView; } VkWriteDescriptorSet;
typedef struct VkMemoryBarrier { VkEnum sType; const void *pNext; VkFlags srcAccessMask, dstAccessMask; } VkMemoryBarrier;
typedef struct VkBufferCopy { VkDeviceSize srcOffset, dstOffset, size; } VkBufferCopy;
typedef struct VkSubmitInfo { VkEnum sType; const void *pNext; uint32_t waitSemaphoreCount; const VkSemaphore *pWaitSemaphores; const VkFlags *pWaitDstStageMask; uint32_t commandBufferCount; const VkCommandBuffer *pCommandBuffers; uint32_t signalSemaphoreCount; const VkSemaphore *pSignalSemaphores; } VkSubmitInfo;
typedef struct VkFenceCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; } VkFenceCreateInfo;
typedef struct VkQueryPoolCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; VkEnum queryType; uint32_t queryCount; VkFlags pipelineStatistics; } VkQueryPoolCreateInfo;
typedef struct VkDebugUtilsMessengerCreateInfoEXT { VkEnum sType; const void *pNext; VkFlags flags, messageSeverity, messageType; PFN_vkDebugUtilsMessengerCallbackEXT pfnUserCallback; void *pUserData; } VkDebugUtilsMessengerCreateInfoEXT;
typedef struct VkDebugUtilsMessengerCallbackDataEXT { VkEnum sType; const void *pNext; VkFlags flags; const char *pMessageIdName; int32_t messageIdNumber; const char *pMessage; uint32_t queueLabelCount; const void *pQueueLabels; uint32_t cmdBufLabelCount; const void *pCmdBufLabels; uint32_t objectCount; const void *pObjects; } VkDebugUtilsMessengerCallbackDataEXT;
typedef struct VkPipelineCacheCreateInfo { VkEnum sType; const void *pNext; VkFlags flags; size_t initialDataSize; const void *pInitialData; } VkPipelineCacheCreateInfo;
/* VkPhysicalDeviceVulkan12Features: only read (a host's device chain), so its 47 flags as an array */
typedef struct VkPhysicalDeviceVulkan12Features { VkEnum sType; const void *pNext; VkBool32 flag[47]; } VkPhysicalDeviceVulkan12Features;
enum { VK12_SHADER_FLOAT16 = 7, VK12_VULKAN_MEMORY_MODEL = 41, VK12_VULKAN_MEMORY_MODEL_DEVICE_SCOPE = 42 };
typedef struct VkBaseInStructure { VkEnum sType; const struct VkBaseInStructure *pNext; } VkBaseInStructure;
/* end of the Vulkan struct subset */

enum { /* VkStructureType values */
    VK_STRUCTURE_TYPE_APPLICATION_INFO = 0, VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1,
    VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO = 2, VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO = 3,
    VK_STRUCTURE_TYPE_SUBMIT_INFO = 4, VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO = 5,
    VK_STRUCTURE_TYPE_FENCE_CREATE_INFO = 8, VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO = 11,
    VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO = 12, VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO = 16,
    VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO = 17, VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO = 18, VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO = 29,
    VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO = 30, VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO = 32,
    VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET = 35, VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO = 39,
    VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO = 40, VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO = 42,
    VK_STRUCTURE_TYPE_MEMORY_BARRIER = 46, VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES = 51,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2 = 1000059000, VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2 = 1000059001,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PUSH_DESCRIPTOR_PROPERTIES_KHR = 1000080000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES = 1000082000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES = 1000094000,
    VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT = 1000128004,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES = 1000168000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES = 1000211000,
    VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV = 1000249000,
    VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV = 1000249001,
};
#define VK_SUCCESS 0
#define VK_TIMEOUT 2
#define VK_INCOMPLETE 5
#define VK_ERROR_OUT_OF_HOST_MEMORY (-1)
#define VK_ERROR_OUT_OF_DEVICE_MEMORY (-2)
#define VK_ERROR_DEVICE_LOST (-4)
#define VK_API_VERSION_1_2 ((1u << 22) | (2u << 12))
#define VK_VERSION_MAJOR(v) ((uint32_t)(v) >> 22)
#define VK_VERSION_MINOR(v) (((uint32_t)(v) >> 12) & 0x3ffu)
#define VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU 1
#define VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU 2
#define VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU 3
#define VK_PHYSICAL_DEVICE_TYPE_CPU 4
#define VK_QUEUE_GRAPHICS_BIT 0x1u
#define VK_QUEUE_COMPUTE_BIT 0x2u
#define VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT 0x1u
#define VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT 0x2u
#define VK_MEMORY_PROPERTY_HOST_COHERENT_BIT 0x4u
#define VK_MEMORY_PROPERTY_HOST_CACHED_BIT 0x8u
#define VK_MEMORY_HEAP_DEVICE_LOCAL_BIT 0x1u
#define VK_BUFFER_USAGE_TRANSFER_SRC_BIT 0x1u
#define VK_BUFFER_USAGE_TRANSFER_DST_BIT 0x2u
#define VK_BUFFER_USAGE_STORAGE_BUFFER_BIT 0x20u
#define VK_SHARING_MODE_EXCLUSIVE 0
#define VK_DESCRIPTOR_TYPE_STORAGE_BUFFER 7
#define VK_DESCRIPTOR_SET_LAYOUT_CREATE_PUSH_DESCRIPTOR_BIT_KHR 0x1u
#define VK_SHADER_STAGE_COMPUTE_BIT 0x20u
#define VK_PIPELINE_BIND_POINT_COMPUTE 1
#define VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT 0x2u
#define VK_COMMAND_BUFFER_LEVEL_PRIMARY 0
#define VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT 0x1u
#define VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT 0x1u
#define VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT 0x800u
#define VK_PIPELINE_STAGE_TRANSFER_BIT 0x1000u
#define VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT 0x2000u
#define VK_PIPELINE_STAGE_HOST_BIT 0x4000u
#define VK_ACCESS_SHADER_READ_BIT 0x20u
#define VK_ACCESS_SHADER_WRITE_BIT 0x40u
#define VK_ACCESS_TRANSFER_READ_BIT 0x800u
#define VK_ACCESS_TRANSFER_WRITE_BIT 0x1000u
#define VK_ACCESS_HOST_READ_BIT 0x2000u
#define VK_ACCESS_HOST_WRITE_BIT 0x4000u
#define VK_QUERY_TYPE_TIMESTAMP 2
#define VK_QUERY_RESULT_64_BIT 0x1u
#define VK_QUERY_RESULT_WAIT_BIT 0x2u
#define VK_SUBGROUP_FEATURE_BASIC_BIT 0x1u
#define VK_SUBGROUP_FEATURE_ARITHMETIC_BIT 0x4u
#define VK_COMPONENT_TYPE_FLOAT16_NV 0
#define VK_COMPONENT_TYPE_FLOAT32_NV 1
#define VK_SCOPE_SUBGROUP_NV 3
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_INFO_BIT_EXT 0x10u
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT 0x100u
#define VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT 0x1000u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT 0x1u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT 0x2u
#define VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT 0x4u
#define VK_WHOLE_SIZE (~0ull)

/* ============================================================================================ */
/* 2. loader                                                                                     */
/* ============================================================================================ */
/* Every entry point this file calls, as (return type, name without "vk", parameters). They live in
   the backend's function table (vk_fns): nothing named vk* is defined or imported globally. */
#define VK_GLOBAL_FNS(X)                                                                                         \
    X(VkResult, CreateInstance, (const VkInstanceCreateInfo *, const void *, VkInstance *))                       \
    X(VkResult, EnumerateInstanceLayerProperties, (uint32_t *, VkLayerProperties *))                             \
    X(VkResult, EnumerateInstanceExtensionProperties, (const char *, uint32_t *, VkExtensionProperties *))

#define VK_INSTANCE_FNS(X)                                                                                       \
    X(void, DestroyInstance, (VkInstance, const void *))                                                         \
    X(VkResult, EnumeratePhysicalDevices, (VkInstance, uint32_t *, VkPhysicalDevice *))                          \
    X(void, GetPhysicalDeviceProperties, (VkPhysicalDevice, VkPhysicalDeviceProperties *))                       \
    X(void, GetPhysicalDeviceProperties2, (VkPhysicalDevice, VkPhysicalDeviceProperties2 *))                     \
    X(void, GetPhysicalDeviceFeatures2, (VkPhysicalDevice, VkPhysicalDeviceFeatures2 *))                         \
    X(void, GetPhysicalDeviceQueueFamilyProperties, (VkPhysicalDevice, uint32_t *, VkQueueFamilyProperties *))   \
    X(void, GetPhysicalDeviceMemoryProperties, (VkPhysicalDevice, VkPhysicalDeviceMemoryProperties *))           \
    X(VkResult, EnumerateDeviceExtensionProperties, (VkPhysicalDevice, const char *, uint32_t *, VkExtensionProperties *)) \
    X(VkResult, CreateDevice, (VkPhysicalDevice, const VkDeviceCreateInfo *, const void *, VkDevice *))          \
    X(PFN_vkVoidFunction, GetDeviceProcAddr, (VkDevice, const char *))

#define VK_DEVICE_FNS(X)                                                                                         \
    X(void, DestroyDevice, (VkDevice, const void *))                                                             \
    X(void, GetDeviceQueue, (VkDevice, uint32_t, uint32_t, VkQueue *))                                           \
    X(VkResult, CreateBuffer, (VkDevice, const VkBufferCreateInfo *, const void *, VkBuffer *))                  \
    X(void, DestroyBuffer, (VkDevice, VkBuffer, const void *))                                                   \
    X(void, GetBufferMemoryRequirements, (VkDevice, VkBuffer, VkMemoryRequirements *))                          \
    X(VkResult, AllocateMemory, (VkDevice, const VkMemoryAllocateInfo *, const void *, VkDeviceMemory *))        \
    X(void, FreeMemory, (VkDevice, VkDeviceMemory, const void *))                                                \
    X(VkResult, BindBufferMemory, (VkDevice, VkBuffer, VkDeviceMemory, VkDeviceSize))                           \
    X(VkResult, MapMemory, (VkDevice, VkDeviceMemory, VkDeviceSize, VkDeviceSize, VkFlags, void **))             \
    X(VkResult, CreateShaderModule, (VkDevice, const VkShaderModuleCreateInfo *, const void *, VkShaderModule *)) \
    X(void, DestroyShaderModule, (VkDevice, VkShaderModule, const void *))                                       \
    X(VkResult, CreateDescriptorSetLayout, (VkDevice, const VkDescriptorSetLayoutCreateInfo *, const void *, VkDescriptorSetLayout *)) \
    X(void, DestroyDescriptorSetLayout, (VkDevice, VkDescriptorSetLayout, const void *))                         \
    X(VkResult, CreatePipelineLayout, (VkDevice, const VkPipelineLayoutCreateInfo *, const void *, VkPipelineLayout *)) \
    X(void, DestroyPipelineLayout, (VkDevice, VkPipelineLayout, const void *))                                   \
    X(VkResult, CreateComputePipelines, (VkDevice, VkPipelineCache, uint32_t, const VkComputePipelineCreateInfo *, const void *, VkPipeline *)) \
    X(void, DestroyPipeline, (VkDevice, VkPipeline, const void *))                                               \
    X(VkResult, CreateCommandPool, (VkDevice, const VkCommandPoolCreateInfo *, const void *, VkCommandPool *))   \
    X(void, DestroyCommandPool, (VkDevice, VkCommandPool, const void *))                                         \
    X(VkResult, AllocateCommandBuffers, (VkDevice, const VkCommandBufferAllocateInfo *, VkCommandBuffer *))      \
    X(VkResult, BeginCommandBuffer, (VkCommandBuffer, const VkCommandBufferBeginInfo *))                         \
    X(VkResult, EndCommandBuffer, (VkCommandBuffer))                                                             \
    X(VkResult, ResetCommandBuffer, (VkCommandBuffer, VkFlags))                                                  \
    X(void, CmdBindPipeline, (VkCommandBuffer, VkEnum, VkPipeline))                                              \
    X(void, CmdPushConstants, (VkCommandBuffer, VkPipelineLayout, VkFlags, uint32_t, uint32_t, const void *))    \
    X(void, CmdDispatch, (VkCommandBuffer, uint32_t, uint32_t, uint32_t))                                        \
    X(void, CmdPipelineBarrier, (VkCommandBuffer, VkFlags, VkFlags, VkFlags, uint32_t, const VkMemoryBarrier *, uint32_t, const void *, uint32_t, const void *)) \
    X(void, CmdCopyBuffer, (VkCommandBuffer, VkBuffer, VkBuffer, uint32_t, const VkBufferCopy *))                \
    X(void, CmdFillBuffer, (VkCommandBuffer, VkBuffer, VkDeviceSize, VkDeviceSize, uint32_t))                    \
    X(void, CmdResetQueryPool, (VkCommandBuffer, VkQueryPool, uint32_t, uint32_t))                               \
    X(void, CmdWriteTimestamp, (VkCommandBuffer, VkFlags, VkQueryPool, uint32_t))                                \
    X(VkResult, CreateQueryPool, (VkDevice, const VkQueryPoolCreateInfo *, const void *, VkQueryPool *))         \
    X(void, DestroyQueryPool, (VkDevice, VkQueryPool, const void *))                                             \
    X(VkResult, GetQueryPoolResults, (VkDevice, VkQueryPool, uint32_t, uint32_t, size_t, void *, VkDeviceSize, VkFlags)) \
    X(VkResult, QueueSubmit, (VkQueue, uint32_t, const VkSubmitInfo *, VkFence))                                 \
    X(VkResult, CreateFence, (VkDevice, const VkFenceCreateInfo *, const void *, VkFence *))                     \
    X(void, DestroyFence, (VkDevice, VkFence, const void *))                                                     \
    X(VkResult, WaitForFences, (VkDevice, uint32_t, const VkFence *, VkBool32, uint64_t))                        \
    X(VkResult, ResetFences, (VkDevice, uint32_t, const VkFence *))                                              \
    X(VkResult, DeviceWaitIdle, (VkDevice))                                                                      \
    X(VkResult, QueueWaitIdle, (VkQueue))                                                                        \
    X(VkResult, CreatePipelineCache, (VkDevice, const VkPipelineCacheCreateInfo *, const void *, VkPipelineCache *)) \
    X(void, DestroyPipelineCache, (VkDevice, VkPipelineCache, const void *))                                     \
    X(VkResult, GetPipelineCacheData, (VkDevice, VkPipelineCache, size_t *, void *))                              \
    X(void, CmdPushDescriptorSetKHR, (VkCommandBuffer, VkEnum, VkPipelineLayout, uint32_t, uint32_t, const VkWriteDescriptorSet *))

/* optional entry points: NULL when absent */
#define VK_OPTIONAL_INSTANCE_FNS(X)                                                                              \
    X(VkResult, CreateDebugUtilsMessengerEXT, (VkInstance, const VkDebugUtilsMessengerCreateInfoEXT *, const void *, VkDebugUtilsMessengerEXT *)) \
    X(void, DestroyDebugUtilsMessengerEXT, (VkInstance, VkDebugUtilsMessengerEXT, const void *))                 \
    X(VkResult, GetPhysicalDeviceCooperativeMatrixPropertiesNV, (VkPhysicalDevice, uint32_t *, VkCooperativeMatrixPropertiesNV *))

typedef struct vk_fns {
    PFN_vkGetInstanceProcAddr GetInstanceProcAddr;
#define VK_FN_FIELD(ret, name, args) ret (VKAPI_PTR *name) args;
    VK_GLOBAL_FNS(VK_FN_FIELD)
    VK_INSTANCE_FNS(VK_FN_FIELD)
    VK_OPTIONAL_INSTANCE_FNS(VK_FN_FIELD)
    VK_DEVICE_FNS(VK_FN_FIELD)
#undef VK_FN_FIELD
} vk_fns;

/* an entry point into a typed slot of the table (function pointers convert through memcpy, which
   is what POSIX dlsym users do anyway) */
static int vk_fn_store(void *slot, PFN_vkVoidFunction fn) {
    memcpy(slot, &fn, sizeof fn);
    return fn != NULL;
}

/* Opens the loader and fills the global entry points. Returns NULL on success or what is missing. */
static const char *vk_load_global(vk_fns *f, void **lib_out) {
    static const char *const names[] = VK_LOADER_NAMES;
    void *lib = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) return VK_LOADER_MISSING;
    void *sym = dlsym(lib, "vkGetInstanceProcAddr");
    if (!sym) {
        dlclose(lib);
        return "the Vulkan loader has no vkGetInstanceProcAddr";
    }
    memcpy(&f->GetInstanceProcAddr, &sym, sizeof sym);
#define VK_LOAD_GLOBAL(ret, name, args)                                                                          \
    if (!vk_fn_store(&f->name, f->GetInstanceProcAddr(NULL, "vk" #name))) {                                      \
        dlclose(lib);                                                                                            \
        return "the Vulkan loader lacks vk" #name;                                                               \
    }
    VK_GLOBAL_FNS(VK_LOAD_GLOBAL)
#undef VK_LOAD_GLOBAL
    *lib_out = lib;
    return NULL;
}

static const char *vk_load_instance(vk_fns *f, VkInstance inst) {
#define VK_LOAD_INST(ret, name, args)                                                                            \
    if (!vk_fn_store(&f->name, f->GetInstanceProcAddr(inst, "vk" #name))) return "vk" #name;
    VK_INSTANCE_FNS(VK_LOAD_INST)
#undef VK_LOAD_INST
#define VK_LOAD_OPT(ret, name, args) vk_fn_store(&f->name, f->GetInstanceProcAddr(inst, "vk" #name));
    VK_OPTIONAL_INSTANCE_FNS(VK_LOAD_OPT)
#undef VK_LOAD_OPT
    return NULL;
}

static const char *vk_load_device(vk_fns *f, VkDevice dev) {
#define VK_LOAD_DEV(ret, name, args)                                                                             \
    if (!vk_fn_store(&f->name, f->GetDeviceProcAddr(dev, "vk" #name))) return "vk" #name;
    VK_DEVICE_FNS(VK_LOAD_DEV)
#undef VK_LOAD_DEV
    return NULL;
}

static const char *vk_result_str(VkResult r) {
    switch (r) {
    case VK_SUCCESS: return "VK_SUCCESS";
    case VK_TIMEOUT: return "VK_TIMEOUT";
    case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
    case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
    case -3: return "VK_ERROR_INITIALIZATION_FAILED";
    case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
    case -5: return "VK_ERROR_MEMORY_MAP_FAILED";
    case -6: return "VK_ERROR_LAYER_NOT_PRESENT";
    case -7: return "VK_ERROR_EXTENSION_NOT_PRESENT";
    case -8: return "VK_ERROR_FEATURE_NOT_PRESENT";
    case -9: return "VK_ERROR_INCOMPATIBLE_DRIVER";
    case -10: return "VK_ERROR_TOO_MANY_OBJECTS";
    case -13: return "VK_ERROR_UNKNOWN";
    default: return "VkResult error";
    }
}

/* ============================================================================================ */
/* 3. backend: instance, device, features                                                        */
/* ============================================================================================ */
#define VK_XBUFS 8            /* weight windows bound per dispatch: binding 6[0..7] (common.glsl XBUFS) */
#define VK_ALIGN 256          /* placement alignment of tensors and bindings (>= any min offset alignment) */
#define VK_PAD 16             /* readable slack after every tensor (dequant.glsl reads up to 16 bytes on) */
#define VK_MAX_EXPERTS 512    /* route.glsl MAX_EXPERTS */
#define VK_MAX_TOPK 32        /* route.glsl MAX_TOPK */
#define VK_MAX_ROPES 4        /* distinct rope settings among a model's layers */
#define VK_VARIANTS 6         /* pipelines per kernel: values of specialization constants 1 and 2 (head size, heads per workgroup) */

/* ---- the host-shader contract ----------------------------------------------------------------
   The text between the BEGIN and END markers below is the one description of the kernels that
   C and GLSL share. gen/embed_shaders reads the kernel table to know which variants to compile
   (one GLSL source, compiled with defines), and copies the push-constant layouts into
   gen/contract.glsl, which every shader includes; `make shaders-check` fails when that copy or
   shaders_embedded.c is stale. Push constants: X(type, field) with type uint, int or float, all
   4 bytes, so the std430 push-constant block and the C struct vk_pc_<kernel> have one layout.
   Pipelines are keyed by (kernel, specialization constants 1 and 2); see vk_pipe. */
/* BEGIN KERNELS */
/* KT(ENUM, name, source, defines, workgroup size): compiled once per weight type of VK_TYPES as
   name_<type> with -DT_<TYPE>; KP(...): one plain kernel */
#define VK_TYPES(T) T(F32, f32) T(F16, f16) T(BF16, bf16) T(Q8_0, q8_0) T(Q4_0, q4_0) T(Q4_K, q4_k) T(Q5_K, q5_k) T(Q6_K, q6_k) T(MXFP4, mxfp4)
#define VK_TYPED_KERNELS(KT)                                        \
    KT(EMBED, embed, "embed.comp", "", 64)                          \
    KT(MV, mv, "mv.comp", "", 64)                                   \
    KT(ROUTE, route, "route_mv.comp", "", 64)                       \
    KT(MM, mm, "mm.comp", "", 256)                                  \
    KT(MMG, mmg, "mm.comp", "-DGATEUP", 256)                        \
    KT(MMCM, mmcm, "mm_cm.comp", "", 128)                           \
    KT(MMCMG, mmcmg, "mm_cm.comp", "-DGATEUP", 128)
#define VK_PLAIN_KERNELS(KP)                                        \
    KP(ADD, add, "add.comp", "", 256)                               \
    KP(ATTN_F16, attn_f16, "attn.comp", "-DKV_F16", 128)            \
    KP(ATTN_F32, attn_f32, "attn.comp", "-DKV_F32", 128)            \
    KP(ATTN_SPLIT_F16, attn_split_f16, "attn.comp", "-DKV_F16 -DSPLIT", 128) \
    KP(ATTN_SPLIT_F32, attn_split_f32, "attn.comp", "-DKV_F32 -DSPLIT", 128) \
    KP(ATTN_TILE_F16, attn_tile_f16, "attn_tile.comp", "-DKV_F16", 128) \
    KP(ATTN_TILE_F32, attn_tile_f32, "attn_tile.comp", "-DKV_F32", 128) \
    KP(HEADWISE_F16, headwise_f16, "headwise.comp", "-DKV_F16", 64) \
    KP(HEADWISE_F32, headwise_f32, "headwise.comp", "-DKV_F32", 64) \
    KP(ATTN_PREP_F16, attn_prep_f16, "attn_prep.comp", "-DKV_F16", 64) \
    KP(ATTN_PREP_F32, attn_prep_f32, "attn_prep.comp", "-DKV_F32", 64) \
    KP(KVSTORE_F16, kvstore_f16, "kvstore.comp", "-DKV_F16", 64)    \
    KP(KVSTORE_F32, kvstore_f32, "kvstore.comp", "-DKV_F32", 64)    \
    KP(MOE_COMBINE, moe_combine, "moe_combine.comp", "", 256)       \
    KP(MOE_SORT, moe_sort, "moe_sort.comp", "", 256)                \
    KP(RMSNORM, rmsnorm, "rmsnorm.comp", "", 256)                   \
    KP(TOPK, topk, "topk.comp", "", 64)                             \
    KP(SCALE, scale, "scale.comp", "", 256)                         \
    KP(GLU, glu, "glu.comp", "", 256)                               \
    KP(SOFTCAP, softcap, "softcap.comp", "", 256)                   \
    KP(COPY, copy, "copy.comp", "", 256)                  \
    KP(SPLIT_HEADS, split_heads, "split_heads.comp", "", 256)       \
    KP(SIGMOID_MUL, sigmoid_mul, "sigmoid_mul.comp", "", 256)       \
    KP(ROW_GATE, row_gate, "row_gate.comp", "", 256)                \
    KP(SSM_CONV, ssm_conv, "ssm_conv.comp", "", 64)                 \
    KP(L2NORM, l2norm, "l2norm.comp", "", 64)                       \
    KP(DELTA_RULE, delta_rule, "delta_rule.comp", "", 128)          \
    KP(DN_CHUNK_GATES, dn_chunk_gates, "dn_chunk_gates.comp", "", 64) \
    KP(DN_CHUNK_PREP, dn_chunk_prep, "dn_chunk_prep.comp", "", 128) \
    KP(DN_CHUNK_STATE, dn_chunk_state, "dn_chunk_state.comp", "", 256) \
    KP(GATED_NORM, gated_norm, "gated_norm.comp", "", 128)
/* END KERNELS */
/* BEGIN PUSH CONSTANTS */
#define PC_ADD(X) X(uint, count)
#define PC_ATTN(X) X(uint, n_head) X(uint, n_kv) X(uint, hd) X(uint, kvw) X(float, scale) X(int, pos_delta) X(uint, window) X(uint, rows) X(uint, chunk) X(uint, n_tok)
#define PC_EMBED(X) X(uint, K) X(uint, row_bytes) X(uint, row_lo) X(uint, row_hi)
#define PC_HEADWISE(X) X(uint, n_heads) X(uint, hd) X(uint, n_rot) X(uint, flags) X(float, eps) X(uint, kvw) X(int, pos_delta) X(uint, rows)
#define PC_ATTN_PREP(X) X(uint, n_head) X(uint, n_kv) X(uint, hd) X(uint, n_rot) X(uint, flags) X(float, eps) X(uint, kvw) X(int, pos_delta) \
    X(uint, rows) X(uint, gq_win) X(uint, gq_off) X(uint, gk_win) X(uint, gk_off)
#define PC_KVSTORE(X) X(uint, kvw) X(int, pos_delta) X(uint, rows)
#define PC_MATRIX(X)                                                      \
    X(uint, K) X(uint, M) X(uint, row_bytes) X(uint, nblk)                \
    X(uint, x_off) X(uint, x_stride) X(uint, y_off) X(uint, y_stride)     \
    X(uint, mode) X(uint, acc) X(uint, tbl0) X(uint, tbl1)
#define PC_MM(X) PC_MATRIX(X) X(uint, ncols) X(uint, k_used) X(uint, list_off) X(uint, items_off) X(uint, act)
#define PC_MV(X) PC_MATRIX(X) X(uint, k_used) X(uint, ids_off) X(uint, w_off) X(uint, act) X(float, eps) X(uint, norm)
#define PC_MOE_COMBINE(X) X(uint, D) X(uint, k_used) X(uint, w_off) X(uint, pos_off) X(uint, acc)
#define PC_MOE_SORT(X) X(uint, E) X(uint, n_pairs) X(uint, ids_off) X(uint, list_off) X(uint, pos_off) X(uint, items_off)
#define PC_RMSNORM(X) X(uint, width) X(uint, has_g) X(uint, rows) X(float, eps)
#define PC_TOPK(X) X(uint, E) X(uint, k_used) X(uint, norm) X(uint, r_off) X(uint, ids_off) X(uint, w_off) X(uint, has_scale)
#define PC_ROUTE(X) X(uint, K) X(uint, M) X(uint, row_bytes) X(uint, nblk) X(uint, x_off) X(uint, x_stride) X(float, eps) X(uint, norm) \
    X(uint, k_used) X(uint, rnorm) X(uint, ids_off) X(uint, w_off) X(uint, has_scale) X(uint, cnt_off)
#define PC_SCALE(X) X(uint, count) X(uint, width) X(uint, has_w) X(float, s)
#define PC_GLU(X) X(uint, count) X(uint, width) X(uint, up_col0) X(uint, up_stride) X(uint, act)
#define PC_SOFTCAP(X) X(uint, count) X(float, cap)
#define PC_COPY(X) X(uint, count)
#define PC_SPLIT_HEADS(X) X(uint, count) X(uint, hd)
#define PC_SIGMOID_MUL(X) X(uint, count)
#define PC_ROW_GATE(X) X(uint, width) X(uint, rows)
#define PC_SSM_CONV(X) X(uint, C) X(uint, K) X(uint, n)
#define PC_L2NORM(X) X(uint, hd) X(uint, heads) X(uint, stride) X(uint, rows) X(uint, n_scaled) X(float, scale) X(float, eps)
#define PC_DELTA_RULE(X) X(uint, nk) X(uint, nv) X(uint, dk) X(uint, dv) X(uint, n) X(uint, C) X(uint, v_tiled) X(uint, grouped)
#define PC_GATED_NORM(X) X(uint, width) X(uint, rows) X(float, eps)
/* END PUSH CONSTANTS */

#define VK_CT_uint uint32_t
#define VK_CT_int int32_t
#define VK_CT_float float
#define VK_PC_FIELD(type, name) VK_CT_##type name;
#define VK_PC_STRUCT(kernel) typedef struct vk_pc_##kernel { PC_##kernel(VK_PC_FIELD) } vk_pc_##kernel;
VK_PC_STRUCT(ADD)
VK_PC_STRUCT(ATTN)
VK_PC_STRUCT(EMBED)
VK_PC_STRUCT(HEADWISE)
VK_PC_STRUCT(ATTN_PREP)
VK_PC_STRUCT(KVSTORE)
VK_PC_STRUCT(MM)
VK_PC_STRUCT(MV)
VK_PC_STRUCT(MOE_COMBINE)
VK_PC_STRUCT(MOE_SORT)
VK_PC_STRUCT(RMSNORM)
VK_PC_STRUCT(TOPK)
VK_PC_STRUCT(ROUTE)
VK_PC_STRUCT(SCALE)
VK_PC_STRUCT(GLU)
VK_PC_STRUCT(SOFTCAP)
VK_PC_STRUCT(COPY)
VK_PC_STRUCT(SPLIT_HEADS)
VK_PC_STRUCT(SIGMOID_MUL)
VK_PC_STRUCT(ROW_GATE)
VK_PC_STRUCT(SSM_CONV)
VK_PC_STRUCT(L2NORM)
VK_PC_STRUCT(DELTA_RULE)
VK_PC_STRUCT(GATED_NORM)
#define VK_PC_WORD(kernel, field) ((int)(offsetof(vk_pc_##kernel, field) / 4)) /* index into vk_rec.pc */

#define VK_ENUM_T(E, n) VKT_##E,
#define VK_NAME_T(E, n) #n,
enum { VK_TYPES(VK_ENUM_T) VKT_COUNT };
static const char *const k_vk_type_names[VKT_COUNT] = {VK_TYPES(VK_NAME_T)};
#define VK_ENUM_K(E, n, src, defs, wg) VKK_##E,
#define VK_NAME_K(E, n, src, defs, wg) #n,
#define VK_WG_K(E, n, src, defs, wg) wg,
enum { VK_TYPED_KERNELS(VK_ENUM_K) VKK_COUNT };
static const char *const k_vk_kind_names[VKK_COUNT] = {VK_TYPED_KERNELS(VK_NAME_K)};
static const uint32_t k_vk_kind_wg[VKK_COUNT] = {VK_TYPED_KERNELS(VK_WG_K)};
#define VK_ENUM_P(E, n, src, defs, wg) VKP_##E,
#define VK_PLAIN_K(E, n, src, defs, wg) {#n, wg},
enum { VKP_FIRST_PLAIN = VKK_COUNT * VKT_COUNT - 1, VK_PLAIN_KERNELS(VK_ENUM_P) VKP_COUNT };
#define VKP_ADD (VKK_COUNT * VKT_COUNT) /* the first plain kernel */
static const struct { const char *name; uint32_t wg; } k_vk_plain[VKP_COUNT - VKP_ADD] = {VK_PLAIN_KERNELS(VK_PLAIN_K)};
#define VKP_TYPED(kind, t) ((kind) * VKT_COUNT + (t))

static int vk_type_index(int32_t type) {
    switch (type) {
    case MOE_TYPE_F32: return VKT_F32;
    case MOE_TYPE_F16: return VKT_F16;
    case MOE_TYPE_BF16: return VKT_BF16;
    case MOE_TYPE_Q8_0: return VKT_Q8_0;
    case MOE_TYPE_Q4_0: return VKT_Q4_0;
    case MOE_TYPE_Q4_K: return VKT_Q4_K;
    case MOE_TYPE_Q5_K: return VKT_Q5_K;
    case MOE_TYPE_Q6_K: return VKT_Q6_K;
    case MOE_TYPE_MXFP4: return VKT_MXFP4;
    default: return -1;
    }
}

typedef struct vk_buf {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceSize size;
    uint8_t *map;              /* host-visible buffers stay mapped */
    int alias;                 /* a copy of a buffer owned elsewhere (the expert stage in a layer's windows): not freed here */
    VkDeviceSize off;          /* a view of rows of another buffer (moe_step_batch's segments): where it starts in buf */
} vk_buf;

/* Where a weight lives: parts (one unless the tensor is larger than a window) of rows
   [row_lo, row_hi) at (window, byte offset); expert tensors: a slice of the expert tables. */
typedef struct vk_part { uint32_t win; VkDeviceSize off, bytes; int64_t row_lo, row_hi; } vk_part;
typedef struct vk_wt {
    uint32_t part0, n_parts;   /* dense: parts[part0 ..] */
    uint32_t tbl, win0;        /* experts: table entries [tbl, tbl + n_expert), windows win0 .. win0+7 */
    int experts;
} vk_wt;

struct moe_vk_backend {
    vk_fns f;
    _Atomic uint64_t ctx_frees; /* contexts freed so far: a batch lead's cached command buffers may bind their caches */
    void *lib;
    VkInstance inst;
    int inst_shared;           /* inst is the process's shared instance (vk_create_instance): not ours to destroy */
    int host;                  /* instance, device and queue are the host's (moe_vk_handles): never destroyed here */
    void (*queue_lock)(void *user, int32_t lock);  /* the host's external sync of its queue, or NULL */
    void *queue_lock_user;
    VkDebugUtilsMessengerEXT messenger;
    VkPhysicalDevice pd;
    VkDevice dev;
    VkQueue queue;
    VkQueue queue_low;         /* a second queue of the family at priority 0 (moe_ctx_params.low_priority); 0 = none */
    uint32_t qfam;
    VkPhysicalDeviceProperties props;
    VkPhysicalDeviceMemoryProperties memp;
    uint32_t subgroup;
    int coopmat, timestamps, validation;
    double ts_ns;              /* nanoseconds per timestamp tick */
    uint64_t ts_mask;
    VkDeviceSize win_cap;      /* bytes a weight window may hold */
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
    VkPipeline pipes[VKP_COUNT][VK_VARIANTS];  /* per kernel, per value of specialization constants 1 and 2 */
    uint32_t pipe_spec[VKP_COUNT][VK_VARIANTS];
    pthread_mutex_t lock;      /* lazy pipeline creation and queue submission */
    VkPipelineCache pcache;    /* every pipeline goes through it (empty unless a valid cache was given) */
    char *pcache_path;         /* written back when the backend is freed, if its contents changed */
    uint64_t pcache_in_sum;    /* checksum and size of the accepted input (0, 0: none) */
    size_t pcache_in_bytes;
    int n_built;               /* pipelines created, and the seconds it took (compiles or cache hits) */
    double t_built;
    int lock_ok;
    vk_buf *win;               /* weight windows */
    uint32_t n_win;
    vk_buf tables, dummy;      /* expert tables [layer][gate, up, down][expert] uvec2; a 256-byte filler */
    vk_part *parts;
    uint32_t n_parts;
    vk_wt *wts;
    uint32_t n_wts;
    const moe_weights *w;
    moe_log_fn log;
    void *log_user;
    uint64_t weight_bytes;     /* device memory of the weights (windows; with the expert cache: dense windows and slots) */
    uint64_t gpu_budget;       /* gpu_budget_bytes (0 = no limit) */
    struct vk_xg *xg;          /* the GPU expert slot cache, NULL when the weights are resident */
    moe_xcache *xc;            /* the host tier below the slot cache (moe.c section 8), NULL: experts from the mapping */
};

static _Atomic long g_vk_validation_messages; /* warnings and errors reported by the validation layer */

static void vk_log(const moe_vk_backend *vk, int32_t level, const char *fmt, ...) {
    if (!vk || !vk->log) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    vk->log(level, buf, vk->log_user);
}

static VkBool32 VKAPI_PTR vk_messenger_cb(VkFlags severity, VkFlags types, const VkDebugUtilsMessengerCallbackDataEXT *data,
                                          void *user) {
    const moe_vk_backend *vk = user;
    int bad = (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) != 0;
    if (bad) g_vk_validation_messages++;
    if (bad || (types & VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT))
        vk_log(vk, (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) ? MOE_LOG_ERROR : bad ? MOE_LOG_WARN : MOE_LOG_DEBUG,
               "vulkan validation: %s", data && data->pMessage ? data->pMessage : "(no message)");
    return 0;
}

static int vk_env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static moe_status vk_fail(moe_status st, const char *fmt, ...) {
    char buf[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    moe_internal_set_error(st, "%s", buf);
    return st;
}

static int vk_has_ext(const VkExtensionProperties *e, uint32_t n, const char *name) {
    for (uint32_t i = 0; i < n; i++)
        if (!strcmp(e[i].extensionName, name)) return 1;
    return 0;
}

static pthread_mutex_t g_vk_instance_mu = PTHREAD_MUTEX_INITIALIZER;
static VkInstance g_vk_instance;       /* the process's shared instance (vk_create_instance) */
static int g_vk_instance_validation;   /* made with the validation layer */

static moe_status vk_create_instance(moe_vk_backend *vk) {
    vk_fns *f = &vk->f;
    const char *layers[1], *exts[2];
    uint32_t n_layers = 0, n_exts = 0;
    VkFlags flags = 0;
    VkDebugUtilsMessengerCreateInfoEXT mci = {VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT, NULL, 0,
        VK_DEBUG_UTILS_MESSAGE_SEVERITY_INFO_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT |
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
            VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        vk_messenger_cb, vk};
    if (vk_env_on("MOE_VK_VALIDATION")) {
        uint32_t n = 0;
        VkLayerProperties *lp = NULL;
        int have_layer = 0, have_utils = 0;
        if (f->EnumerateInstanceLayerProperties(&n, NULL) == VK_SUCCESS && n && (lp = calloc(n, sizeof *lp)) &&
            f->EnumerateInstanceLayerProperties(&n, lp) >= VK_SUCCESS)
            for (uint32_t i = 0; i < n; i++) have_layer |= !strcmp(lp[i].layerName, "VK_LAYER_KHRONOS_validation");
        free(lp);
        VkExtensionProperties *ep = NULL;
        n = 0;
        if (f->EnumerateInstanceExtensionProperties(NULL, &n, NULL) == VK_SUCCESS && n && (ep = calloc(n, sizeof *ep)) &&
            f->EnumerateInstanceExtensionProperties(NULL, &n, ep) >= VK_SUCCESS)
            have_utils = vk_has_ext(ep, n, "VK_EXT_debug_utils");
        free(ep);
        if (have_layer && have_utils) {
            layers[n_layers++] = "VK_LAYER_KHRONOS_validation";
            exts[n_exts++] = "VK_EXT_debug_utils";
            vk->validation = 1;
        } else
            vk_log(vk, MOE_LOG_WARN, "MOE_VK_VALIDATION is set but %s is not available (Debian: vulkan-validationlayers)",
                   have_layer ? "VK_EXT_debug_utils" : "VK_LAYER_KHRONOS_validation");
    }
#ifdef __APPLE__
    { /* MoltenVK's devices are only listed to instances that ask for portability devices */
        uint32_t n = 0;
        VkExtensionProperties *ep = NULL;
        if (f->EnumerateInstanceExtensionProperties(NULL, &n, NULL) == VK_SUCCESS && n && (ep = calloc(n, sizeof *ep)) &&
            f->EnumerateInstanceExtensionProperties(NULL, &n, ep) >= VK_SUCCESS && vk_has_ext(ep, n, "VK_KHR_portability_enumeration")) {
            exts[n_exts++] = "VK_KHR_portability_enumeration";
            flags |= 0x00000001; /* VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR */
        }
        free(ep);
    }
#endif
    VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "moe", 1, "moe", 1, VK_API_VERSION_1_2};
    VkInstanceCreateInfo ici = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, NULL, flags, &app, n_layers, layers, n_exts, exts};
    /* One instance per process, made by the first model and kept: every vkDestroyInstance lets the
       loader unload the driver, and the NVIDIA driver, loaded and unloaded again, stops loading
       after about 30 rounds in one process (vkCreateInstance: VK_ERROR_INCOMPATIBLE_DRIVER; seen
       on the H100 machine with driver 580). Models created with and without MOE_VK_VALIDATION
       need different instances: the other kind gets one of its own, destroyed with its model. */
    VkResult r = VK_SUCCESS;
    pthread_mutex_lock(&g_vk_instance_mu);
    if (g_vk_instance && g_vk_instance_validation == vk->validation) {
        vk->inst = g_vk_instance;
        vk->inst_shared = 1;
    } else {
        r = f->CreateInstance(&ici, NULL, &vk->inst);
        if (r == VK_SUCCESS && !g_vk_instance) {
            g_vk_instance = vk->inst;
            g_vk_instance_validation = vk->validation;
            vk->inst_shared = 1;
        }
    }
    pthread_mutex_unlock(&g_vk_instance_mu);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateInstance failed (%s)", vk_result_str(r));
    const char *missing = vk_load_instance(f, vk->inst);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the loader lacks %s", missing);
    if (vk->validation && f->CreateDebugUtilsMessengerEXT) {
        r = f->CreateDebugUtilsMessengerEXT(vk->inst, &mci, NULL, &vk->messenger);
        if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateDebugUtilsMessengerEXT failed (%s)", vk_result_str(r));
    }
    return MOE_OK;
}

/* What a physical device offers; why[] is empty when it can run moe. */
typedef struct vk_probe {
    VkPhysicalDevice pd;
    VkPhysicalDeviceProperties props;
    uint32_t qfam, subgroup, ts_bits, qcount;
    VkDeviceSize max_alloc;
    int coopmat, global_priority;   /* VK_EXT_global_priority (or _KHR) offered: logged, not used */
    int portability;                /* VK_KHR_portability_subset offered (MoltenVK): must be enabled */
    char why[200];
} vk_probe;

#ifdef MOE_TEST_HOOKS                         /* test builds only (the tests set these directly) */
static VkDeviceSize g_vk_window_cap_override; /* test hook: smaller weight windows to exercise splits */
static int g_vk_cpu_device_as_gpu;            /* test hook: CPU-type devices (lavapipe) count as GPUs for AUTO */
#else
#define g_vk_window_cap_override ((VkDeviceSize)0)
#define g_vk_cpu_device_as_gpu 0
#endif

static void vk_probe_device(moe_vk_backend *vk, VkPhysicalDevice pd, vk_probe *p) {
    vk_fns *f = &vk->f;
    memset(p, 0, sizeof *p);
    p->pd = pd;
    VkPhysicalDeviceSubgroupProperties sg = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES, NULL, 0, 0, 0, 0};
    VkPhysicalDevicePushDescriptorPropertiesKHR pdp = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PUSH_DESCRIPTOR_PROPERTIES_KHR, &sg, 0};
    VkPhysicalDeviceMaintenance3Properties m3 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES, &pdp, 0, 0};
    VkPhysicalDeviceProperties2 pr2;
    memset(&pr2, 0, sizeof pr2);
    pr2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
    pr2.pNext = &m3;
    f->GetPhysicalDeviceProperties(pd, &p->props);
    const VkPhysicalDeviceLimits *lim = &p->props.limits;
    char name[64]; /* a copy: snprintf into p->why must not read from *p */
    snprintf(name, sizeof name, "%.63s", p->props.deviceName);
    if (p->props.apiVersion < VK_API_VERSION_1_2) {
        snprintf(p->why, sizeof p->why, "%s: Vulkan %u.%u, 1.2 is needed", name, VK_VERSION_MAJOR(p->props.apiVersion),
                 VK_VERSION_MINOR(p->props.apiVersion));
        return;
    }
    f->GetPhysicalDeviceProperties2(pd, &pr2);
    p->subgroup = sg.subgroupSize;
    p->max_alloc = m3.maxMemoryAllocationSize ? m3.maxMemoryAllocationSize : ((VkDeviceSize)1 << 30);
    uint32_t nq = 0;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32) nq = 32;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    int q = -1;
    for (uint32_t i = 0; i < nq; i++) /* a compute queue; one that also has timestamps is better */
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && (q < 0 || (!qf[q].timestampValidBits && qf[i].timestampValidBits))) q = (int)i;
    uint32_t n_ext = 0;
    VkExtensionProperties *ext = NULL;
    if (f->EnumerateDeviceExtensionProperties(pd, NULL, &n_ext, NULL) == VK_SUCCESS && n_ext)
        ext = calloc(n_ext, sizeof *ext);
    if (ext && f->EnumerateDeviceExtensionProperties(pd, NULL, &n_ext, ext) < VK_SUCCESS) n_ext = 0;
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV, NULL, 0, 0};
    VkPhysicalDeviceVulkanMemoryModelFeatures vmm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, NULL, 0, 0, 0};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &vmm, 0, 0};
    int has_cm_ext = ext && vk_has_ext(ext, n_ext, "VK_NV_cooperative_matrix");
    p->global_priority = ext && (vk_has_ext(ext, n_ext, "VK_EXT_global_priority") || vk_has_ext(ext, n_ext, "VK_KHR_global_priority"));
    p->portability = ext && vk_has_ext(ext, n_ext, "VK_KHR_portability_subset");
    if (has_cm_ext) vmm.pNext = &cmf;
    VkPhysicalDeviceFeatures2 ft;
    memset(&ft, 0, sizeof ft);
    ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    ft.pNext = &f16;
    f->GetPhysicalDeviceFeatures2(pd, &ft);
    const uint32_t sg_need = VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT;
    if (q < 0) snprintf(p->why, sizeof p->why, "%s: no compute queue", name);
    else if (!ext || !vk_has_ext(ext, n_ext, "VK_KHR_push_descriptor"))
        snprintf(p->why, sizeof p->why, "%s: lacks VK_KHR_push_descriptor", name);
    else if (!(sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) || (sg.supportedOperations & sg_need) != sg_need || sg.subgroupSize < 4)
        snprintf(p->why, sizeof p->why, "%s: lacks subgroup arithmetic in compute shaders (or subgroups of >= 4)", name);
    else if (!ft.features.shaderStorageBufferArrayDynamicIndexing)
        snprintf(p->why, sizeof p->why, "%s: lacks shaderStorageBufferArrayDynamicIndexing", name);
    else if (pdp.maxPushDescriptors < 6 + VK_XBUFS + 1 || lim->maxPerStageDescriptorStorageBuffers < 6 + VK_XBUFS + 1)
        snprintf(p->why, sizeof p->why, "%s: fewer than %d storage-buffer (push) descriptors per stage", name, 6 + VK_XBUFS + 1);
    else if (lim->maxComputeSharedMemorySize < 32768 || lim->maxComputeWorkGroupInvocations < 256 || lim->maxPushConstantsSize < 128)
        snprintf(p->why, sizeof p->why, "%s: compute limits too small (32 KiB shared memory, 256 invocations needed)", name);
    else if (lim->maxStorageBufferRange < (1u << 24))
        snprintf(p->why, sizeof p->why, "%s: maxStorageBufferRange %u is below 16 MiB", name, lim->maxStorageBufferRange);
    if (!p->why[0]) {
        p->qfam = (uint32_t)q;
        p->qcount = qf[q].queueCount;
        p->ts_bits = lim->timestampComputeAndGraphics ? qf[q].timestampValidBits : 0;
    }
    /* tensor cores: GL_NV_cooperative_matrix 16x8x16, f16 inputs, f32 accumulators, subgroup of 32 */
    if (!p->why[0] && has_cm_ext && cmf.cooperativeMatrix && f16.shaderFloat16 && vmm.vulkanMemoryModel &&
        vmm.vulkanMemoryModelDeviceScope && sg.subgroupSize == 32 &&
        lim->maxComputeSharedMemorySize >= 48 * 1024 && f->GetPhysicalDeviceCooperativeMatrixPropertiesNV && !vk_env_on("MOE_VK_NO_COOPMAT")) {
        uint32_t n = 0;
        VkCooperativeMatrixPropertiesNV cp[64];
        if (f->GetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, NULL) >= VK_SUCCESS) {
            if (n > 64) n = 64;
            for (uint32_t i = 0; i < n; i++) {
                memset(&cp[i], 0, sizeof cp[i]);
                cp[i].sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV;
            }
            if (f->GetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, cp) >= VK_SUCCESS)
                for (uint32_t i = 0; i < n; i++)
                    p->coopmat |= cp[i].MSize == 16 && cp[i].NSize == 8 && cp[i].KSize == 16 && cp[i].AType == VK_COMPONENT_TYPE_FLOAT16_NV &&
                                  cp[i].BType == VK_COMPONENT_TYPE_FLOAT16_NV && cp[i].CType == VK_COMPONENT_TYPE_FLOAT32_NV &&
                                  cp[i].DType == VK_COMPONENT_TYPE_FLOAT32_NV && cp[i].scope == VK_SCOPE_SUBGROUP_NV;
        }
    }
    free(ext);
}

/* The backend takes the probed device's properties, queue family and limits. */
static void vk_adopt_probe(moe_vk_backend *vk, const vk_probe *p) {
    vk_fns *f = &vk->f;
    vk->pd = p->pd;
    vk->props = p->props;
    vk->qfam = p->qfam;
    vk->subgroup = p->subgroup;
    vk->coopmat = p->coopmat;
    vk->timestamps = p->ts_bits > 0;
    vk->ts_ns = p->props.limits.timestampPeriod;
    vk->ts_mask = p->ts_bits >= 64 ? ~0ull : (1ull << p->ts_bits) - 1;
    f->GetPhysicalDeviceMemoryProperties(vk->pd, &vk->memp);
    VkDeviceSize cap = p->props.limits.maxStorageBufferRange;
    if (cap > p->max_alloc) cap = p->max_alloc;
    if (cap > 0xffffffffull) cap = 0xffffffffull;
    if (g_vk_window_cap_override && g_vk_window_cap_override < cap) cap = g_vk_window_cap_override;
    vk->win_cap = (cap - VK_ALIGN) / VK_ALIGN * VK_ALIGN;
}

static int vk_type_rank(VkEnum t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 0;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 1;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 3;
    default: return 4;
    }
}

/* Picks the device_index-th usable device, discrete GPUs first, and creates the logical device.
   gpu_only (MOE_BACKEND_AUTO): CPU-type devices (Mesa's lavapipe/llvmpipe, SwiftShader) are left
   out, since moe's own CPU backend runs the same work hundreds of times faster on the same cores;
   MOE_BACKEND_VULKAN asked for explicitly still reaches them (ranked last). */
static moe_status vk_create_device(moe_vk_backend *vk, int32_t device_index, int gpu_only) {
    vk_fns *f = &vk->f;
    uint32_t n = 0;
    VkResult r = f->EnumeratePhysicalDevices(vk->inst, &n, NULL);
    if (r != VK_SUCCESS || n == 0) return vk_fail(MOE_ERR_DEVICE, "Vulkan: no physical device (is a driver installed? Debian: mesa-vulkan-drivers)");
    VkPhysicalDevice pds[16];
    vk_probe probes[16];
    if (n > 16) n = 16;
    r = f->EnumeratePhysicalDevices(vk->inst, &n, pds);
    if (r < VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkEnumeratePhysicalDevices failed (%s)", vk_result_str(r));
    int order[16], n_ok = 0, n_cpu_type = 0;
    char why[480] = "";
    for (uint32_t i = 0; i < n; i++) {
        vk_probe_device(vk, pds[i], &probes[i]);
        if (!probes[i].why[0] && gpu_only && probes[i].props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU && !g_vk_cpu_device_as_gpu) {
            char name[64];
            snprintf(name, sizeof name, "%.63s", probes[i].props.deviceName);
            snprintf(probes[i].why, sizeof probes[i].why, "%s is a CPU-type Vulkan device, slower than the CPU backend", name);
            n_cpu_type++;
        }
        if (probes[i].why[0]) {
            size_t l = strlen(why);
            snprintf(why + l, sizeof why - l, "%s%s", l ? "; " : "", probes[i].why);
            continue;
        }
        int j = n_ok++; /* insertion by rank, stable */
        while (j > 0 && vk_type_rank(probes[order[j - 1]].props.deviceType) > vk_type_rank(probes[i].props.deviceType)) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = (int)i;
    }
    if (n_ok == 0 && n_cpu_type)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: no GPU (%s; MOE_BACKEND_VULKAN uses it anyway)", why);
    if (n_ok == 0) return vk_fail(MOE_ERR_DEVICE, "Vulkan: no usable device (%s)", why);
    if (device_index >= n_ok)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: device_index %d but only %d usable device(s)", device_index, n_ok);
    const vk_probe *p = &probes[order[device_index]];
    vk_adopt_probe(vk, p);

    /* two queues where the family has them: priority 1 for normal contexts, 0 for low_priority ones
       (priorities only order the queues of this device; VK_EXT_global_priority, which would rank
       the device against other processes' rendering, needs privileges and is not asked for) */
    float prio[2] = {1.0f, 0.0f};
    VkDeviceQueueCreateInfo qci = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, NULL, 0, vk->qfam, p->qcount >= 2 ? 2u : 1u, prio};
    /* a portability device (MoltenVK) must get VK_KHR_portability_subset enabled (the spec) */
    const char *exts[3] = {"VK_KHR_push_descriptor", NULL, NULL};
    uint32_t n_exts = 1;
    if (vk->coopmat) exts[n_exts++] = "VK_NV_cooperative_matrix";
    if (p->portability) exts[n_exts++] = "VK_KHR_portability_subset";
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV, NULL, 1, 0};
    /* the coopmat shaders use the Vulkan memory model; with it on, every shader's atomics (device
       scope by default in GLSL) need vulkanMemoryModelDeviceScope too */
    VkPhysicalDeviceVulkanMemoryModelFeatures vmm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, &cmf, 1, 1, 0};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &vmm, 1, 0};
    VkPhysicalDeviceFeatures2 ft;
    memset(&ft, 0, sizeof ft);
    ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    ft.pNext = vk->coopmat ? &f16 : NULL;
    ft.features.shaderStorageBufferArrayDynamicIndexing = 1;
    VkDeviceCreateInfo dci = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, &ft, 0, 1, &qci, 0, NULL, n_exts, exts, NULL};
    r = f->CreateDevice(vk->pd, &dci, NULL, &vk->dev);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateDevice on %s failed (%s)", p->props.deviceName, vk_result_str(r));
    const char *missing = vk_load_device(f, vk->dev);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the driver of %s lacks %s", p->props.deviceName, missing);
    f->GetDeviceQueue(vk->dev, vk->qfam, 0, &vk->queue);
    if (p->qcount >= 2) f->GetDeviceQueue(vk->dev, vk->qfam, 1, &vk->queue_low);
    vk_log(vk, MOE_LOG_INFO, "Vulkan: queue family %u has %u queue(s)%s (%u discrete priorities; global priority extension %s)",
           vk->qfam, p->qcount,
           vk->queue_low ? ": a second one at priority 0 serves low_priority contexts" : ": low_priority contexts share the one queue",
           p->props.limits.discreteQueuePriorities, p->global_priority ? "offered, not used" : "not offered");
    vk_log(vk, MOE_LOG_INFO, "Vulkan device %d: %s (Vulkan %u.%u, subgroup %u, max storage buffer %u MiB%s%s%s)", device_index,
           p->props.deviceName, VK_VERSION_MAJOR(p->props.apiVersion), VK_VERSION_MINOR(p->props.apiVersion), vk->subgroup,
           (unsigned)(p->props.limits.maxStorageBufferRange >> 20), vk->coopmat ? ", NV cooperative matrix" : "",
           vk->timestamps ? ", timestamps" : "", vk->validation ? ", validation layer on" : "");
    return MOE_OK;
}

/* ---- host-owned objects (moe_vk_handles) ----
   Vulkan cannot be asked what a VkDevice was created with, so what is enabled comes from the host's
   VkDeviceCreateInfo (device_create_info) when given; without it the required items are taken as
   enabled (moe_vk_requirements says they must be) and nothing optional is used. */
typedef struct vk_enabled {
    int known;                                   /* read from a VkDeviceCreateInfo */
    int push_descriptor, coopmat_ext;            /* extensions */
    int dyn_index, f16, vmm, vmm_dev, coopmat;   /* features */
} vk_enabled;

static moe_status vk_read_enabled(const VkDeviceCreateInfo *dci, vk_enabled *e) {
    memset(e, 0, sizeof *e);
    if (!dci) {
        e->push_descriptor = e->dyn_index = 1;
        return MOE_OK;
    }
    if (dci->sType != VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO)
        return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_handles.device_create_info: sType %d is not VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO", dci->sType);
    e->known = 1;
    for (uint32_t i = 0; i < dci->enabledExtensionCount; i++) {
        const char *x = dci->ppEnabledExtensionNames ? dci->ppEnabledExtensionNames[i] : NULL;
        if (!x) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_handles.device_create_info: extension name %u is NULL", i);
        e->push_descriptor |= !strcmp(x, "VK_KHR_push_descriptor");
        e->coopmat_ext |= !strcmp(x, "VK_NV_cooperative_matrix");
    }
    if (dci->pEnabledFeatures) e->dyn_index = dci->pEnabledFeatures->shaderStorageBufferArrayDynamicIndexing != 0;
    int depth = 0;
    for (const VkBaseInStructure *b = dci->pNext; b; b = b->pNext) {
        if (++depth > 64) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_handles.device_create_info: pNext chain longer than 64 (a loop?)");
        switch (b->sType) {
        case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2:
            e->dyn_index |= ((const VkPhysicalDeviceFeatures2 *)(const void *)b)->features.shaderStorageBufferArrayDynamicIndexing != 0;
            break;
        case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES: {
            const VkPhysicalDeviceVulkan12Features *v = (const void *)b;
            e->f16 |= v->flag[VK12_SHADER_FLOAT16] != 0;
            e->vmm |= v->flag[VK12_VULKAN_MEMORY_MODEL] != 0;
            e->vmm_dev |= v->flag[VK12_VULKAN_MEMORY_MODEL_DEVICE_SCOPE] != 0;
            break;
        }
        case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES:
            e->f16 |= ((const VkPhysicalDeviceShaderFloat16Int8Features *)(const void *)b)->shaderFloat16 != 0;
            break;
        case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES: {
            const VkPhysicalDeviceVulkanMemoryModelFeatures *v = (const void *)b;
            e->vmm |= v->vulkanMemoryModel != 0;
            e->vmm_dev |= v->vulkanMemoryModelDeviceScope != 0;
            break;
        }
        case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV:
            e->coopmat |= ((const VkPhysicalDeviceCooperativeMatrixFeaturesNV *)(const void *)b)->cooperativeMatrix != 0;
            break;
        default: break;
        }
    }
    return MOE_OK;
}

/* Takes the host's instance, device and queue: loads the entry points through its
   vkGetInstanceProcAddr, probes the physical device as for moe's own, and checks what the device
   was created with against what moe relies on. Creates nothing. */
static moe_status vk_adopt_host(moe_vk_backend *vk, const moe_vk_handles *h) {
    vk_fns *f = &vk->f;
    vk->host = 1;
    if (h->get_instance_proc_addr) memcpy(&f->GetInstanceProcAddr, &h->get_instance_proc_addr, sizeof f->GetInstanceProcAddr);
    else {
        const char *why = vk_load_global(f, &vk->lib);
        if (why) return vk_fail(MOE_ERR_DEVICE, "Vulkan: %s", why);
    }
    vk_enabled en;
    moe_status st = vk_read_enabled(h->device_create_info, &en);
    if (st) return st;
    vk->inst = (VkInstance)h->instance;
    const char *missing = vk_load_instance(f, vk->inst);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's vkGetInstanceProcAddr gives no %s", missing);
    VkPhysicalDevice pd = (VkPhysicalDevice)h->physical_device;
    uint32_t nq = 0;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32) nq = 32;
    f->GetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    if (h->queue_family >= nq || !(qf[h->queue_family].queueFlags & VK_QUEUE_COMPUTE_BIT))
        return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_handles: queue_family %u is not a compute queue family of the physical device (%u families)",
                       h->queue_family, nq);
    vk_probe p;
    vk_probe_device(vk, pd, &p);
    if (p.why[0]) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device cannot run moe: %s", p.why);
    p.qfam = h->queue_family; /* the host's queue, whatever family moe would have picked */
    p.ts_bits = p.props.limits.timestampComputeAndGraphics ? qf[h->queue_family].timestampValidBits : 0;
    vk_adopt_probe(vk, &p);
    char name[64];
    snprintf(name, sizeof name, "%.63s", p.props.deviceName);
    vk->dev = (VkDevice)h->device;
    if (en.known && !en.push_descriptor)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device (%s) was created without VK_KHR_push_descriptor (moe_vk_requirements lists it)", name);
    if (!en.dyn_index)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device (%s) was created without the feature shaderStorageBufferArrayDynamicIndexing "
                       "(moe_vk_requirements lists it)", name);
    /* with the memory model on, moe's atomics (device scope in GLSL) are only valid with device scope too */
    if (en.vmm && !en.vmm_dev)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device (%s) enables vulkanMemoryModel without vulkanMemoryModelDeviceScope, "
                       "which moe's shaders then need", name);
    missing = vk_load_device(f, vk->dev);
    if (missing && !f->CmdPushDescriptorSetKHR)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device (%s) gives no vkCmdPushDescriptorSetKHR: created without VK_KHR_push_descriptor "
                       "(moe_vk_requirements lists it)", name);
    if (missing) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the host's device (%s) gives no %s", name, missing);
    int cm = p.coopmat && en.coopmat_ext && en.coopmat && en.f16 && en.vmm && en.vmm_dev;
    if (p.coopmat && !cm)
        vk_log(vk, MOE_LOG_WARN, "Vulkan: the host's device lacks %s: prefill matmuls without cooperative matrices (slower)",
               !en.known ? "a device_create_info (what it enables is unknown)"
               : !en.coopmat_ext ? "VK_NV_cooperative_matrix" : !en.coopmat ? "the feature cooperativeMatrix"
               : !en.f16 ? "the feature shaderFloat16" : "the features vulkanMemoryModel(DeviceScope)");
    vk->coopmat = cm;
    vk->queue = (VkQueue)h->queue;
    vk->queue_lock = h->queue_lock;
    vk->queue_lock_user = h->queue_lock_user;
    vk_log(vk, MOE_LOG_INFO, "Vulkan: the host's device %s (Vulkan %u.%u, subgroup %u, queue family %u%s%s%s)", name,
           VK_VERSION_MAJOR(p.props.apiVersion), VK_VERSION_MINOR(p.props.apiVersion), vk->subgroup, vk->qfam,
           vk->coopmat ? ", NV cooperative matrix" : "", vk->timestamps ? ", timestamps" : "", vk->queue_lock ? ", host queue lock" : "");
    return MOE_OK;
}

/* a function the loader exports (object and function pointers convert through memcpy, as in vk_load_global) */
static PFN_vkVoidFunction vk_dlsym_fn(void *lib, const char *name) {
    void *sym = dlsym(lib, name);
    PFN_vkVoidFunction fn;
    memcpy(&fn, &sym, sizeof fn);
    return fn;
}

/* appends one line to a text being measured and written up to cap */
static void vk_line(char *buf, size_t cap, size_t *n, const char *kind, const char *name) {
    char line[128];
    int l = snprintf(line, sizeof line, "%s %s\n", kind, name);
    if (buf && *n + (size_t)l <= cap) memcpy(buf + *n, line, (size_t)l);
    *n += (size_t)l;
}

moe_status moe_vk_requirements(void *physical_device, void *get_instance_proc_addr, char *buf, int32_t cap, int32_t *n_out) {
    if (n_out) *n_out = 0;
    if (!physical_device || !n_out || cap < 0 || (!buf && cap))
        return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_requirements: physical_device and n_out are required, buf with cap > 0 or NULL with 0");
    (void)get_instance_proc_addr; /* needs an instance for physical-device queries; the loader's exports need none */
    moe_vk_backend *vk = calloc(1, sizeof *vk);
    if (!vk) return vk_fail(MOE_ERR_NO_MEMORY, "moe_vk_requirements: out of memory");
    moe_status st = MOE_OK;
    const char *why = vk_load_global(&vk->f, &vk->lib);
    if (why) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: %s", why);
    /* the loader's trampolines dispatch on the handle, from any instance */
#define VK_LOAD_EXPORT(ret, name, args)                                                                          \
    if (!st && !vk_fn_store(&vk->f.name, vk_dlsym_fn(vk->lib, "vk" #name)))                                      \
        st = vk_fail(MOE_ERR_DEVICE, "Vulkan: the loader does not export vk" #name);
    VK_INSTANCE_FNS(VK_LOAD_EXPORT)
#undef VK_LOAD_EXPORT
    vk_probe p;
    if (!st) {
        vk_probe_device(vk, (VkPhysicalDevice)physical_device, &p);
        if (p.why[0]) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: %s", p.why);
    }
    /* p.coopmat also needs the NV properties query, which only an instance gives: the features decide here */
    int cm = 0;
    if (!st && p.subgroup == 32 && p.props.limits.maxComputeSharedMemorySize >= 48 * 1024) {
        VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV, NULL, 0, 0};
        VkPhysicalDeviceVulkanMemoryModelFeatures vmm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, &cmf, 0, 0, 0};
        VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &vmm, 0, 0};
        uint32_t n_ext = 0;
        VkExtensionProperties *ext = NULL;
        if (vk->f.EnumerateDeviceExtensionProperties(p.pd, NULL, &n_ext, NULL) == VK_SUCCESS && n_ext &&
            (ext = calloc(n_ext, sizeof *ext)) && vk->f.EnumerateDeviceExtensionProperties(p.pd, NULL, &n_ext, ext) >= VK_SUCCESS &&
            vk_has_ext(ext, n_ext, "VK_NV_cooperative_matrix")) {
            VkPhysicalDeviceFeatures2 ft;
            memset(&ft, 0, sizeof ft);
            ft.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
            ft.pNext = &f16;
            vk->f.GetPhysicalDeviceFeatures2(p.pd, &ft);
            cm = cmf.cooperativeMatrix && f16.shaderFloat16 && vmm.vulkanMemoryModel && vmm.vulkanMemoryModelDeviceScope;
        }
        free(ext);
    }
    free(vk);
    if (st) return st;
    size_t n = 0, c = buf ? (size_t)cap : 0;
    vk_line(buf, c, &n, "api", "1.2");
    vk_line(buf, c, &n, "extension", "VK_KHR_push_descriptor");
    vk_line(buf, c, &n, "feature", "shaderStorageBufferArrayDynamicIndexing");
    if (p.portability) vk_line(buf, c, &n, "extension", "VK_KHR_portability_subset"); /* MoltenVK: the spec requires it */
    if (cm) { /* optional: prefill on tensor cores */
        vk_line(buf, c, &n, "extension", "VK_NV_cooperative_matrix");
        vk_line(buf, c, &n, "feature", "cooperativeMatrix");
        vk_line(buf, c, &n, "feature", "shaderFloat16");
        vk_line(buf, c, &n, "feature", "vulkanMemoryModel");
        vk_line(buf, c, &n, "feature", "vulkanMemoryModelDeviceScope");
    }
    *n_out = (int32_t)n;
    if (n > c) return vk_fail(MOE_ERR_BUFFER_TOO_SMALL, "moe_vk_requirements: needs %zu bytes, buffer has %zu", n, c);
    if (n < c) buf[n] = 0;
    return MOE_OK;
}

/* ============================================================================================ */
/* 4. memory                                                                                     */
/* ============================================================================================ */
enum { VK_MEM_DEVICE, VK_MEM_HOST, VK_MEM_HOST_READ };

static VkDeviceSize vk_align_up(VkDeviceSize v, VkDeviceSize a) { return (v + a - 1) / a * a; }

/* a memory type in bits with all of want; prefer also: first try want|prefer */
static int vk_mem_type(const moe_vk_backend *vk, uint32_t bits, VkFlags want, VkFlags prefer) {
    for (int pass = 0; pass < 2; pass++) {
        VkFlags need = pass == 0 ? want | prefer : want;
        for (uint32_t i = 0; i < vk->memp.memoryTypeCount; i++)
            if ((bits & (1u << i)) && (vk->memp.memoryTypes[i].propertyFlags & need) == need) return (int)i;
    }
    return -1;
}

static void vk_buf_free(moe_vk_backend *vk, vk_buf *b) {
    if (!vk || !vk->dev || !b) return;
    if (b->alias) {
        memset(b, 0, sizeof *b);
        return;
    }
    if (b->buf) vk->f.DestroyBuffer(vk->dev, b->buf, NULL);
    if (b->mem) vk->f.FreeMemory(vk->dev, b->mem, NULL); /* frees the mapping too */
    memset(b, 0, sizeof *b);
}

/* A storage buffer with its own memory: device-local, or host-visible + coherent (and mapped). */
static moe_status vk_buf_new(moe_vk_backend *vk, vk_buf *b, VkDeviceSize size, int kind, const char *what) {
    vk_fns *f = &vk->f;
    memset(b, 0, sizeof *b);
    size = vk_align_up(size ? size : 4, 4);
    VkBufferCreateInfo bci = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, NULL, 0, size,
                              VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              VK_SHARING_MODE_EXCLUSIVE, 0, NULL};
    VkResult r = f->CreateBuffer(vk->dev, &bci, NULL, &b->buf);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateBuffer (%s, %llu bytes) failed (%s)", what, (unsigned long long)size, vk_result_str(r));
    VkMemoryRequirements req;
    f->GetBufferMemoryRequirements(vk->dev, b->buf, &req);
    int t = kind == VK_MEM_DEVICE ? vk_mem_type(vk, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0)
          : vk_mem_type(vk, req.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT,
                        kind == VK_MEM_HOST_READ ? VK_MEMORY_PROPERTY_HOST_CACHED_BIT : 0);
    if (t < 0) {
        vk_buf_free(vk, b);
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: no suitable memory type for %s", what);
    }
    VkMemoryAllocateInfo mai = {VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, NULL, req.size, (uint32_t)t};
    r = f->AllocateMemory(vk->dev, &mai, NULL, &b->mem);
    if (r == VK_SUCCESS) r = f->BindBufferMemory(vk->dev, b->buf, b->mem, 0);
    if (r == VK_SUCCESS && kind != VK_MEM_DEVICE) {
        void *p = NULL;
        r = f->MapMemory(vk->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &p);
        b->map = p;
    }
    if (r != VK_SUCCESS) {
        vk_buf_free(vk, b);
        return vk_fail(r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY ? MOE_ERR_NO_MEMORY : MOE_ERR_DEVICE,
                       "Vulkan: allocating %.1f MiB for %s failed (%s)", (double)size / 1048576.0, what, vk_result_str(r));
    }
    b->size = size;
    return MOE_OK;
}

/* ---- transfers: host <-> device buffers through two host-visible staging halves, so that the
   CPU fills one half while the GPU copies the other. Errors stick in x->st. ---- */
typedef struct vk_region { VkBuffer buf; VkDeviceSize soff, doff, size; uint8_t *host; } vk_region;
typedef struct vk_half { vk_buf stage; VkCommandBuffer cb; VkFence fence; vk_region *reg; int n, cap, pending; } vk_half;
typedef struct vk_xfer {
    moe_vk_backend *vk;
    VkCommandPool pool;
    vk_half h[2];
    int cur, download;
    VkDeviceSize fill, half_size;
    moe_status st;
} vk_xfer;

static moe_status vk_wait_fence(moe_vk_backend *vk, VkFence fence, const char *what) {
    VkResult r = vk->f.WaitForFences(vk->dev, 1, &fence, 1, 120ull * 1000000000ull);
    if (r == VK_SUCCESS) r = vk->f.ResetFences(vk->dev, 1, &fence);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: waiting for %s failed (%s)", what, vk_result_str(r));
    return MOE_OK;
}

static moe_status vk_submit_on(moe_vk_backend *vk, VkQueue q, VkCommandBuffer cb, VkFence fence, const char *what) {
    VkSubmitInfo si = {VK_STRUCTURE_TYPE_SUBMIT_INFO, NULL, 0, NULL, NULL, 1, &cb, 0, NULL};
    pthread_mutex_lock(&vk->lock);
    if (vk->queue_lock) vk->queue_lock(vk->queue_lock_user, 1);
    VkResult r = vk->f.QueueSubmit(q, 1, &si, fence);
    if (vk->queue_lock) vk->queue_lock(vk->queue_lock_user, 0);
    pthread_mutex_unlock(&vk->lock);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkQueueSubmit (%s) failed (%s)", what, vk_result_str(r));
    return MOE_OK;
}
static moe_status vk_submit(moe_vk_backend *vk, VkCommandBuffer cb, VkFence fence, const char *what) {
    return vk_submit_on(vk, vk->queue, cb, fence, what);
}

static void vk_xfer_wait(vk_xfer *x, int i) {
    vk_half *h = &x->h[i];
    if (!h->pending) return;
    h->pending = 0;
    moe_status st = vk_wait_fence(x->vk, h->fence, "a transfer");
    if (st && !x->st) x->st = st;
    if (!st && x->download)
        for (int k = 0; k < h->n; k++) memcpy(h->reg[k].host, h->stage.map + h->reg[k].soff, h->reg[k].size);
    h->n = 0;
}

static void vk_xfer_flush(vk_xfer *x) {
    vk_half *h = &x->h[x->cur];
    if (x->st || h->n == 0) return;
    vk_fns *f = &x->vk->f;
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO, NULL, VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT, NULL};
    VkResult r = f->ResetCommandBuffer(h->cb, 0);
    if (r == VK_SUCCESS) r = f->BeginCommandBuffer(h->cb, &bi);
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: recording a transfer failed (%s)", vk_result_str(r));
        return;
    }
    /* make earlier device writes visible to the copies, and the copies to later work */
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_HOST_WRITE_BIT,
                          VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    f->CmdPipelineBarrier(h->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                          VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    for (int k = 0; k < h->n; k++) {
        VkBufferCopy c = {h->reg[k].soff, h->reg[k].doff, h->reg[k].size};
        if (x->download) {
            c.srcOffset = h->reg[k].doff;
            c.dstOffset = h->reg[k].soff;
            f->CmdCopyBuffer(h->cb, h->reg[k].buf, h->stage.buf, 1, &c);
        } else
            f->CmdCopyBuffer(h->cb, h->stage.buf, h->reg[k].buf, 1, &c);
    }
    VkMemoryBarrier mb2 = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT,
                           VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_HOST_READ_BIT};
    f->CmdPipelineBarrier(h->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                          0, 1, &mb2, 0, NULL, 0, NULL);
    r = f->EndCommandBuffer(h->cb);
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: recording a transfer failed (%s)", vk_result_str(r));
        return;
    }
    moe_status st = vk_submit(x->vk, h->cb, h->fence, "transfer");
    if (st) {
        x->st = st;
        return;
    }
    h->pending = 1;
    x->cur ^= 1;
    x->fill = 0;
    vk_xfer_wait(x, x->cur);
}

/* queues a copy of n bytes between host and (buf, off) */
static void vk_xfer_copy(vk_xfer *x, uint8_t *host, VkDeviceSize n, VkBuffer buf, VkDeviceSize off) {
    while (n > 0 && !x->st) {
        vk_half *h = &x->h[x->cur];
        if (x->fill + 16 > x->half_size || h->n == h->cap) {
            vk_xfer_flush(x);
            continue;
        }
        VkDeviceSize c = x->half_size - x->fill < n ? x->half_size - x->fill : n;
        vk_region *g = &h->reg[h->n++];
        g->buf = buf;
        g->soff = x->fill;
        g->doff = off;
        g->size = c;
        g->host = host;
        if (!x->download) memcpy(h->stage.map + x->fill, host, c);
        x->fill = vk_align_up(x->fill + c, 16);
        host += c;
        off += c;
        n -= c;
    }
}

static moe_status vk_xfer_end(vk_xfer *x) {
    if (!x->st) vk_xfer_flush(x);
    for (int i = 0; i < 2; i++) vk_xfer_wait(x, i);
    moe_vk_backend *vk = x->vk;
    for (int i = 0; i < 2; i++) {
        if (x->h[i].fence) vk->f.DestroyFence(vk->dev, x->h[i].fence, NULL);
        vk_buf_free(vk, &x->h[i].stage);
        free(x->h[i].reg);
    }
    if (x->pool) vk->f.DestroyCommandPool(vk->dev, x->pool, NULL);
    moe_status st = x->st;
    memset(x, 0, sizeof *x);
    return st;
}

static moe_status vk_xfer_begin(moe_vk_backend *vk, vk_xfer *x, VkDeviceSize half, int download) {
    memset(x, 0, sizeof *x);
    x->vk = vk;
    x->download = download;
    x->half_size = half;
    vk_fns *f = &vk->f;
    VkCommandPoolCreateInfo pci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, vk->qfam};
    VkResult r = f->CreateCommandPool(vk->dev, &pci, NULL, &x->pool);
    VkCommandBuffer cbs[2] = {0, 0};
    VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, x->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, 2};
    if (r == VK_SUCCESS) r = f->AllocateCommandBuffers(vk->dev, &cai, cbs);
    VkFenceCreateInfo fci = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO, NULL, 0};
    for (int i = 0; i < 2 && r == VK_SUCCESS; i++) {
        x->h[i].cb = cbs[i];
        r = f->CreateFence(vk->dev, &fci, NULL, &x->h[i].fence);
    }
    if (r != VK_SUCCESS) {
        x->st = vk_fail(MOE_ERR_DEVICE, "Vulkan: setting up a transfer failed (%s)", vk_result_str(r));
        return vk_xfer_end(x);
    }
    for (int i = 0; i < 2; i++) {
        moe_status st = vk_buf_new(vk, &x->h[i].stage, half, download ? VK_MEM_HOST_READ : VK_MEM_HOST, "a staging buffer");
        x->h[i].cap = 1024;
        x->h[i].reg = calloc((size_t)x->h[i].cap, sizeof(vk_region));
        if (!st && !x->h[i].reg) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        if (st) {
            x->st = st;
            return vk_xfer_end(x);
        }
    }
    return MOE_OK;
}

/* one host-to-device copy, waited for (a context's tables, its counters that start at zero) */
static moe_status vk_upload(moe_vk_backend *vk, void *host, VkDeviceSize bytes, VkBuffer buf, VkDeviceSize off) {
    VkDeviceSize half = bytes < 4096 ? 4096 : bytes < ((VkDeviceSize)8 << 20) ? vk_align_up(bytes, 16) : (VkDeviceSize)8 << 20;
    vk_xfer x;
    moe_status st = vk_xfer_begin(vk, &x, half, 0);
    if (st) return st;
    vk_xfer_copy(&x, host, bytes, buf, off);
    return vk_xfer_end(&x);
}

/* ---- weights: placement into windows, upload, expert tables ---- */
typedef struct vk_placer { VkDeviceSize cap, used; uint32_t cur; VkDeviceSize *win_used; uint32_t n_win, win_cap_n; } vk_placer;

/* room for bytes (+ padding) in the current window, or a new window; returns 0 when out of memory */
static int vk_place(vk_placer *p, VkDeviceSize bytes, uint32_t *win, VkDeviceSize *off) {
    VkDeviceSize at = vk_align_up(p->used, VK_ALIGN);
    if (p->n_win == 0 || at + bytes + VK_PAD > p->cap) {
        if (p->n_win == p->win_cap_n) {
            uint32_t nc = p->win_cap_n ? 2 * p->win_cap_n : 16;
            VkDeviceSize *nw = realloc(p->win_used, nc * sizeof *nw);
            if (!nw) return 0;
            p->win_used = nw;
            p->win_cap_n = nc;
        }
        p->cur = p->n_win++;
        at = 0;
    }
    *win = p->cur;
    *off = at;
    p->used = at + bytes + VK_PAD;
    p->win_used[p->cur] = p->used;
    return 1;
}

/* every tensor role of the model in a fixed order (global roles, then layer by layer);
   i < vk_n_weights(w); absent tensors have no data. w->dev is the backend's to set. */
static int vk_n_weights(const moe_weights *w) { return MOE_GT_COUNT + w->hp.n_layer * MOE_LT_COUNT; }
static int vk_weight_layer(int i) { return i < MOE_GT_COUNT ? -1 : (i - MOE_GT_COUNT) / MOE_LT_COUNT; }
static moe_weight *vk_weight_at(const moe_weights *w, int i) {
    if (i < MOE_GT_COUNT) return moe_weight_of(w, -1, i);
    return moe_weight_of(w, vk_weight_layer(i), (i - MOE_GT_COUNT) % MOE_LT_COUNT);
}

/* checks what the kernels assume about a weight */
static moe_status vk_check_weight(const moe_weight *w, int role) {
    if (vk_type_index(w->type) < 0) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: tensor '%s' has type %d, which has no kernel", w->name, w->type);
    if (role == MOE_SSM_CONV) /* read whole by ssm_conv.comp, not by the matrix kernels */
        return w->type == MOE_TYPE_F32 ? MOE_OK : vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: conv tensor '%s' is not f32", w->name);
    if (w->n_dims >= 2 && w->ne[0] % 16)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: tensor '%s' has rows of %lld elements (kernels need a multiple of 16)", w->name, (long long)w->ne[0]);
    if (w->n_dims == 1 && w->type != MOE_TYPE_F32) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: 1-D tensor '%s' is not f32", w->name);
    return MOE_OK;
}

/* ============================================================================================ */
/* GPU expert slot cache (issue 11, tier 1; DESIGN.md "Expert streaming")                        */
/* ============================================================================================ */
/* With a gpu_budget_bytes below what the resident weights take on the device, the non-expert
   weights stay resident (device windows as always) and every layer's experts get:
     - host-visible windows holding all of the layer's experts (copied from the file once at load;
       the mapping's pages are given back afterwards): the "home" of each expert, which the GPU
       reads directly over the bus for a miss, so the router's choice never has to reach the host
       before the experts run;
     - device-local slot windows: the layer's share of the budget left after the non-expert
       weights and the tables, in slots of one expert (all its slabs, each VK_ALIGN-aligned with
       VK_PAD slack).
   Both sit among the layer's 8 bound windows (binding 6), host windows first, so the expert
   table entry of (tensor, expert) points at either place and the kernels never change: the same
   kernels read the same bytes, so the logits equal the resident run's bit for bit at every
   budget, for any number of distinct experts a step needs (a large prefill reads what does not
   fit from host-visible memory).
   After each step the routed ids of every MoE layer (copied by the step itself into a
   host-visible route log, no extra sync) are counted as hits (expert in a slot) and misses;
   missed experts take slots given up by the eviction policy of moe.c section 8 (moe_xs_victim,
   one moe_xs_pol per layer; never a slot the step itself used, nor a protected one when the
   step needs more distinct experts than the layer has slots) and the copies into those slots, with the table
   updates, are queued on the queue without waiting: they run before the next step (queue order
   and barriers also order them after steps of other contexts still in flight).
   Over a host tier (host_budget_bytes below the weights too: vk->xc, moe.c section 8) there is
   no home for every expert: each layer's homes are one shared "stage" (host-visible windows laid
   out as one layer's experts, aliased as the first windows of every MoE layer's binding), and the
   router's choice reaches the host at the route op (vk_xg_route_sync): the step is submitted up to
   the layer's top-k, one wait, then the layer's missed experts are gathered from the host cache
   (pread on a host miss) into the stage, and the copies stage -> slot plus the layer's table
   update go first in the next submission, ahead of the layer's expert kernels (one copy
   submission per layer). Experts beyond the layer's slots (a large prefill) are read from the
   stage. The previous step's choice of the next layer is handed to the host cache's I/O threads
   as a prefetch while the GPU computes. Contexts of the model take turns per step (step_mu):
   the stage and the slots are the model's. */
#define VK_XG_T 4 /* expert tensors per layer */

typedef struct vk_xg {
    int L, E, policy;
    uint32_t *home;            /* [n_tbl] (relative window, offset) of each expert slab in host-visible memory */
    uint32_t n_tbl;
    uint32_t *win0;            /* [L] first window of the layer's experts */
    int32_t *lt_n;             /* [L] expert tensors of the layer */
    uint32_t *lt_tbl;          /* [L][VK_XG_T] first table entry of tensor t */
    uint64_t *lt_len, *lt_roff;/* [L][VK_XG_T] slab bytes; offset of its region in a slot */
    uint64_t *unit;            /* [L] bytes of one expert (its slabs) */
    int32_t *s0, *ns;          /* [L] first slot and number of slots of the layer */
    moe_xs_pol *pol;           /* [L] the eviction policy of each layer's slots (they compete among themselves) */
    int32_t n_slots;
    uint32_t *slot_win;        /* [n_slots] relative window of the slot */
    uint64_t *slot_off;        /* [n_slots] its byte offset there */
    int32_t *key;              /* [n_slots] expert held, -1 none */
    uint8_t *state;            /* [n_slots] 0 empty, 2 ready (moe_xs_victim's states) */
    int32_t *map;              /* [L·E] slot of expert e of layer l, -1: read from its home */
    pthread_mutex_t mu;
    int mu_ok;
    VkCommandPool pool;        /* queued slot fills: two command buffers, used in turn */
    VkCommandBuffer cb[2];
    VkFence fence[2];
    int pending[2], cur;
    int reset;                 /* fills failed to reach the queue: every entry goes back to its home first */
    vk_buf mirror[2];          /* host-visible copy of the table per command buffer: updates are copied from it */
    uint64_t host_bytes, slot_bytes_total;
    /* over a host tier (vk->xc) */
    vk_buf *stage;             /* [n_stage] the shared homes */
    uint32_t n_stage;
    pthread_mutex_t step_mu;   /* held from a context's begin_step to its end_step */
    int step_mu_ok;
} vk_xg;

static void vk_xg_free(moe_vk_backend *vk) {
    vk_xg *x = vk->xg;
    if (!x) return;
    for (int i = 0; i < 2; i++) {
        if (x->pending[i]) vk->f.WaitForFences(vk->dev, 1, &x->fence[i], 1, 120ull * 1000000000ull);
        if (x->fence[i]) vk->f.DestroyFence(vk->dev, x->fence[i], NULL);
        vk_buf_free(vk, &x->mirror[i]);
    }
    if (x->pool) vk->f.DestroyCommandPool(vk->dev, x->pool, NULL);
    if (x->mu_ok) pthread_mutex_destroy(&x->mu);
    if (x->step_mu_ok) pthread_mutex_destroy(&x->step_mu);
    for (uint32_t i = 0; i < x->n_stage; i++) vk_buf_free(vk, &x->stage[i]);
    free(x->stage);
    free(x->home);
    free(x->win0);
    free(x->lt_n);
    free(x->lt_tbl);
    free(x->lt_len);
    free(x->lt_roff);
    free(x->unit);
    free(x->s0);
    free(x->ns);
    for (int l = 0; x->pol && l < x->L; l++) moe_xs_pol_free(&x->pol[l]);
    free(x->pol);
    free(x->slot_win);
    free(x->slot_off);
    free(x->key);
    free(x->state);
    free(x->map);
    free(x);
    vk->xg = NULL;
}

/* a host-visible, coherent, mapped buffer, in system memory where the device has such a type (not
   device-local: the GPU reads it over the bus) */
static moe_status vk_xg_host_buf(moe_vk_backend *vk, vk_buf *b, VkDeviceSize size) {
    vk_fns *f = &vk->f;
    memset(b, 0, sizeof *b);
    size = vk_align_up(size ? size : 4, 4);
    VkBufferCreateInfo bci = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, NULL, 0, size,
                              VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              VK_SHARING_MODE_EXCLUSIVE, 0, NULL};
    VkResult r = f->CreateBuffer(vk->dev, &bci, NULL, &b->buf);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreateBuffer (host-visible experts) failed (%s)", vk_result_str(r));
    VkMemoryRequirements req;
    f->GetBufferMemoryRequirements(vk->dev, b->buf, &req);
    VkFlags want = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int t = -1;
    for (int pass = 0; pass < 2 && t < 0; pass++)
        for (uint32_t i = 0; i < vk->memp.memoryTypeCount && t < 0; i++) {
            VkFlags fl = vk->memp.memoryTypes[i].propertyFlags;
            if ((req.memoryTypeBits & (1u << i)) && (fl & want) == want && (pass == 1 || !(fl & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT))) t = (int)i;
        }
    if (t < 0) {
        vk_buf_free(vk, b);
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: no host-visible memory type for the experts");
    }
    VkMemoryAllocateInfo mai = {VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, NULL, req.size, (uint32_t)t};
    r = f->AllocateMemory(vk->dev, &mai, NULL, &b->mem);
    if (r == VK_SUCCESS) r = f->BindBufferMemory(vk->dev, b->buf, b->mem, 0);
    void *p = NULL;
    if (r == VK_SUCCESS) r = f->MapMemory(vk->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &p);
    if (r != VK_SUCCESS) {
        vk_buf_free(vk, b);
        return vk_fail(r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY ? MOE_ERR_NO_MEMORY : MOE_ERR_DEVICE,
                       "Vulkan: allocating %.1f MiB of host-visible memory for the experts failed (%s)", (double)size / 1048576.0, vk_result_str(r));
    }
    b->map = p;
    b->size = size;
    return MOE_OK;
}

/* Places the experts of every layer (host-visible homes, device slots) after the dense windows,
   writes them to their homes and the table entries (tbl: absolute entries, filled here) pointing
   at them. dense_bytes: device bytes of the dense windows already allocated; tbl_bytes: of the
   table. Called from vk_upload_weights when the budget asks for streaming. */
static moe_status vk_xg_place(moe_vk_backend *vk, const moe_weights *w, uint32_t *tbl, uint32_t n_tbl, uint64_t dense_bytes,
                              uint64_t tbl_bytes) {
    const moe_hparams *hp = &w->hp;
    int L = hp->n_layer, E = hp->n_expert;
    vk_xg *x = calloc(1, sizeof *x);
    if (!x) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    vk->xg = x;
    x->L = L;
    x->E = E;
    x->n_tbl = n_tbl;
    if ((x->policy = moe_xs_policy_env()) < 0)
        return vk_fail(MOE_ERR_INVALID_ARG, "moe_load: MOE_EVICT=%s: expected lru, lfu or slru", getenv("MOE_EVICT"));
    size_t LT = (size_t)L * VK_XG_T;
    if (!(x->home = calloc(n_tbl ? 2 * (size_t)n_tbl : 2, sizeof *x->home)) || !(x->win0 = calloc((size_t)L, sizeof *x->win0)) ||
        !(x->lt_n = calloc((size_t)L, sizeof *x->lt_n)) || !(x->lt_tbl = calloc(LT, sizeof *x->lt_tbl)) ||
        !(x->lt_len = calloc(LT, sizeof *x->lt_len)) || !(x->lt_roff = calloc(LT, sizeof *x->lt_roff)) ||
        !(x->unit = calloc((size_t)L, sizeof *x->unit)) || !(x->s0 = calloc((size_t)L, sizeof *x->s0)) ||
        !(x->ns = calloc((size_t)L, sizeof *x->ns)) || !(x->pol = calloc((size_t)L, sizeof *x->pol)) || !(x->map = malloc((size_t)L * (size_t)E * sizeof *x->map)))
        return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    for (size_t i = 0; i < (size_t)L * (size_t)E; i++) x->map[i] = -1;
    /* per layer: its expert tensors and the slot layout */
    uint64_t max_slot = 0;
    int n_moe = 0;
    uint64_t *slot_b = calloc((size_t)L, sizeof *slot_b);
    if (!slot_b) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    for (int l = 0; l < L; l++) {
        int i0 = MOE_GT_COUNT + l * MOE_LT_COUNT;
        for (int i = i0; i < i0 + MOE_LT_COUNT; i++) {
            const moe_weight *mw = vk_weight_at(w, i);
            if (!mw->data || !vk->wts[i].experts) continue;
            int t = x->lt_n[l]++;
            if (t >= VK_XG_T || mw->ne[2] != E) {
                free(slot_b);
                return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the expert cache needs at most %d expert tensors of %d experts per layer (layer %d)",
                               VK_XG_T, E, l);
            }
            x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] = vk->wts[i].tbl;
            x->lt_len[(size_t)l * VK_XG_T + (size_t)t] = mw->expert_bytes;
            x->lt_roff[(size_t)l * VK_XG_T + (size_t)t] = slot_b[l];
            slot_b[l] += vk_align_up(mw->expert_bytes + VK_PAD, VK_ALIGN);
            x->unit[l] += mw->expert_bytes;
        }
        if (x->lt_n[l]) n_moe++;
        if (slot_b[l] > max_slot) max_slot = slot_b[l];
    }
    uint64_t budget = vk->gpu_budget, fixed = dense_bytes + tbl_bytes, min = fixed + (uint64_t)hp->n_expert_used * max_slot;
    if (budget < min) {
        free(slot_b);
        return vk_fail(MOE_ERR_NO_MEMORY, "moe_load: gpu_budget_bytes %llu is below the minimum working set of %llu bytes (%.1f MiB: resident "
                       "non-expert weights and expert tables %llu + %d expert slots of %llu bytes)", (unsigned long long)budget,
                       (unsigned long long)min, (double)min / 1048576.0, (unsigned long long)fixed, hp->n_expert_used, (unsigned long long)max_slot);
    }
    /* slots: the rest of the budget, shared out over the MoE layers */
    uint64_t S = max_slot ? (budget - fixed) / max_slot : 0;
    int k = 0;
    for (int l = 0; l < L; l++) {
        if (!x->lt_n[l]) continue;
        uint64_t n = S / (uint64_t)n_moe + ((uint64_t)k++ < S % (uint64_t)n_moe ? 1 : 0);
        x->ns[l] = (int32_t)(n > (uint64_t)E ? (uint64_t)E : n);
        x->s0[l] = x->n_slots;
        x->n_slots += x->ns[l];
    }
    size_t ns = (size_t)(x->n_slots ? x->n_slots : 1);
    if (!(x->slot_win = calloc(ns, sizeof *x->slot_win)) || !(x->slot_off = calloc(ns, sizeof *x->slot_off)) ||
        !(x->key = malloc(ns * sizeof *x->key)) || !(x->state = calloc(ns, 1))) {
        free(slot_b);
        return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    }
    for (size_t i = 0; i < ns; i++) x->key[i] = -1;
    for (int l = 0; l < L; l++)
        if (!moe_xs_pol_init(&x->pol[l], x->policy, x->ns[l], E, x->key + x->s0[l])) {
            free(slot_b);
            return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        }
    moe_status st = MOE_OK;
    if (vk->xc) { /* the stage: as many host-visible windows as the widest layer's homes need, each as large as any layer's */
        VkDeviceSize *sz = NULL;
        for (int l = 0; l < L && !st; l++) {
            if (!x->lt_n[l]) continue;
            vk_placer pl = {vk->win_cap, 0, 0, NULL, 0, 0};
            for (int t = 0; t < x->lt_n[l] && !st; t++)
                for (int e = 0; e < E; e++) {
                    uint32_t win;
                    VkDeviceSize off;
                    if (!vk_place(&pl, x->lt_len[(size_t)l * VK_XG_T + (size_t)t], &win, &off)) { st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory"); break; }
                }
            if (!st && pl.n_win > x->n_stage) {
                VkDeviceSize *nz = realloc(sz, pl.n_win * sizeof *nz);
                if (!nz) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
                else {
                    sz = nz;
                    for (uint32_t i = x->n_stage; i < pl.n_win; i++) sz[i] = 0;
                    x->n_stage = pl.n_win;
                }
            }
            for (uint32_t i = 0; i < pl.n_win && !st; i++) sz[i] = pl.win_used[i] > sz[i] ? pl.win_used[i] : sz[i];
            free(pl.win_used);
        }
        if (!st && !(x->stage = calloc(x->n_stage ? x->n_stage : 1, sizeof *x->stage))) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        uint32_t n_made = 0;
        for (; n_made < x->n_stage && !st; n_made++) {
            st = vk_xg_host_buf(vk, &x->stage[n_made], vk_align_up(sz[n_made], VK_ALIGN));
            if (!st) x->host_bytes += x->stage[n_made].size;
        }
        if (st) x->n_stage = n_made; /* vk_xg_free frees what was made */
        free(sz);
    }
    /* windows: per MoE layer, host-visible windows with every expert (the stage over a host tier), then the slot windows */
    for (int l = 0; l < L && !st; l++) {
        if (!x->lt_n[l]) continue;
        vk_placer pl = {vk->win_cap, 0, 0, NULL, 0, 0};
        for (int t = 0; t < x->lt_n[l] && !st; t++) {
            uint32_t j0 = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t];
            uint64_t len = x->lt_len[(size_t)l * VK_XG_T + (size_t)t];
            for (int e = 0; e < E; e++) {
                uint32_t win;
                VkDeviceSize off;
                if (!vk_place(&pl, len, &win, &off)) { st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory"); break; }
                tbl[2 * (j0 + (uint32_t)e)] = win;
                tbl[2 * (j0 + (uint32_t)e) + 1] = (uint32_t)off;
            }
        }
        uint64_t per_win = slot_b[l] ? vk->win_cap / slot_b[l] : 1;
        uint32_t n_sw = per_win ? (uint32_t)(((uint64_t)x->ns[l] + per_win - 1) / per_win) : 0;
        if (!st && pl.n_win + n_sw > VK_XBUFS)
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the experts of layer %d need %u host-visible and %u slot windows (at most %d together)", l,
                         pl.n_win, n_sw, VK_XBUFS);
        vk_buf *nw = st ? NULL : realloc(vk->win, (vk->n_win + pl.n_win + n_sw) * sizeof *nw);
        if (!st && !nw) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        if (!st) vk->win = nw;
        x->win0[l] = vk->n_win;
        for (uint32_t i = 0; i < pl.n_win && !st; i++) {
            if (vk->xc) {
                vk->win[vk->n_win] = x->stage[i];
                vk->win[vk->n_win++].alias = 1;
                continue;
            }
            st = vk_xg_host_buf(vk, &vk->win[vk->n_win], vk_align_up(pl.win_used[i], VK_ALIGN));
            if (!st) x->host_bytes += vk->win[vk->n_win++].size;
        }
        for (uint32_t i = 0; i < n_sw && !st; i++) {
            uint64_t in_win = (uint64_t)x->ns[l] - (uint64_t)i * per_win;
            in_win = in_win < per_win ? in_win : per_win;
            st = vk_buf_new(vk, &vk->win[vk->n_win], in_win * slot_b[l], VK_MEM_DEVICE, "expert slots");
            if (!st) {
                x->slot_bytes_total += vk->win[vk->n_win].size;
                vk->weight_bytes += vk->win[vk->n_win++].size;
            }
        }
        for (int32_t i = 0; i < x->ns[l] && !st; i++) {
            x->slot_win[x->s0[l] + i] = pl.n_win + (uint32_t)((uint64_t)i / per_win);
            x->slot_off[x->s0[l] + i] = ((uint64_t)i % per_win) * slot_b[l];
        }
        /* the experts to their homes; table entries relative to the layer's first window */
        for (int t = 0; t < x->lt_n[l] && !st; t++) {
            uint32_t j0 = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t];
            const moe_weight *mw = NULL;
            for (int i = MOE_GT_COUNT + l * MOE_LT_COUNT; i < MOE_GT_COUNT + (l + 1) * MOE_LT_COUNT; i++)
                if (vk->wts[i].experts && vk->wts[i].tbl == j0) mw = vk_weight_at(w, i);
            for (int e = 0; e < E; e++) {
                uint32_t j = j0 + (uint32_t)e;
                if (!vk->xc) memcpy(vk->win[x->win0[l] + tbl[2 * j]].map + tbl[2 * j + 1], mw->expert_data[e], (size_t)mw->expert_bytes);
                x->home[2 * j] = tbl[2 * j];
                x->home[2 * j + 1] = tbl[2 * j + 1];
            }
        }
        for (int i = MOE_GT_COUNT + l * MOE_LT_COUNT; i < MOE_GT_COUNT + (l + 1) * MOE_LT_COUNT; i++)
            if (vk->wts[i].experts) vk->wts[i].win0 = x->win0[l];
        free(pl.win_used);
    }
    free(slot_b);
    if (st) return st;
    /* the queue side: a command pool, two command buffers with fences, two table mirrors */
    if (pthread_mutex_init(&x->mu, NULL) != 0) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: cannot create a mutex");
    x->mu_ok = 1;
    VkCommandPoolCreateInfo pci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, vk->qfam};
    VkResult r = vk->f.CreateCommandPool(vk->dev, &pci, NULL, &x->pool);
    VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, x->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, 2};
    if (r == VK_SUCCESS) r = vk->f.AllocateCommandBuffers(vk->dev, &cai, x->cb);
    VkFenceCreateInfo fci = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO, NULL, 0};
    for (int i = 0; i < 2 && r == VK_SUCCESS; i++) r = vk->f.CreateFence(vk->dev, &fci, NULL, &x->fence[i]);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: setting up the expert cache's transfers failed (%s)", vk_result_str(r));
    for (int i = 0; i < 2 && !st; i++) st = vk_buf_new(vk, &x->mirror[i], (VkDeviceSize)(n_tbl ? n_tbl : 1) * 8, VK_MEM_HOST, "expert table updates");
    if (st) return st;
    if (vk->xc) { /* over a host tier mirror 0 is the host's copy of the whole table (updated a layer range at a time) */
        memcpy(x->mirror[0].map, x->home, (size_t)n_tbl * 8);
        if (pthread_mutex_init(&x->step_mu, NULL) != 0) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: cannot create a mutex");
        x->step_mu_ok = 1;
    }
    vk_log(vk, MOE_LOG_INFO, "Vulkan: GPU expert cache: %d expert slots (%.1f MiB) under a budget of %.1f MiB (resident non-expert weights and "
           "tables %.1f MiB); misses read from %.1f MiB of host-visible memory%s; %s eviction", x->n_slots,
           (double)x->slot_bytes_total / 1048576.0, (double)budget / 1048576.0, (double)fixed / 1048576.0, (double)x->host_bytes / 1048576.0,
           vk->xc ? " (one layer's stage, filled from the host tier at each MoE layer's route op)" : "",
           moe_xs_policy_name(x->policy));
    return MOE_OK;
}

int moe_vk_streams_experts(const moe_vk_backend *vk) { return vk && vk->xg; }

/* gpu_exact: prefill matrix products take the f32 tile kernels (mm.comp) instead of the f16
   cooperative-matrix ones. Pipelines are made on first use, so switching before the first step
   is all it takes. */
void moe_vk_use_exact(moe_vk_backend *vk) {
    if (vk && vk->coopmat) {
        vk->coopmat = 0;
        vk_log(vk, MOE_LOG_INFO, "Vulkan: gpu_exact: prefill matrix products in f32, tensor cores not used");
    }
}

static moe_status vk_upload_weights(moe_vk_backend *vk, const moe_weights *w) {
    const moe_hparams *hp = &w->hp;
    int n = vk_n_weights(w);
    moe_status st = MOE_OK;
    vk_placer pl = {vk->win_cap, 0, 0, NULL, 0, 0};
    size_t n_tbl = 0; /* expert table entries: one per expert of every 3-D tensor, layer by layer */
    for (int i = 0; i < n; i++) {
        const moe_weight *mw = vk_weight_at(w, i);
        if (mw->data && mw->n_dims == 3) n_tbl += (size_t)mw->ne[2];
    }
    uint32_t *tbl = calloc(n_tbl ? 2 * n_tbl : 2, sizeof *tbl);      /* (window, offset) pairs, absolute for now */
    VkDeviceSize *tbl_off = calloc(n_tbl ? n_tbl : 1, sizeof *tbl_off); /* full offsets, to check the 32-bit range */
    vk->wts = calloc((size_t)n, sizeof *vk->wts);
    vk->parts = NULL;
    uint32_t parts_cap = 0, tbl_next = 0;
    if (!tbl || !tbl_off || !vk->wts) {
        st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        goto done;
    }
    vk->n_wts = (uint32_t)n;
    int stream = 0; /* the GPU expert slot cache: experts are placed by vk_xg_place */
place:
    /* 1. placement */
    for (int i = 0; i < n && !st; i++) {
        moe_weight *mw = vk_weight_at(w, i);
        vk_wt *wt = &vk->wts[i];
        if (!mw->data) continue;
        if (i == MOE_OUTPUT && mw->data == w->g[MOE_TOK_EMBD].data) { /* tied output: share the embedding's placement */
            *wt = vk->wts[MOE_TOK_EMBD];
            continue;
        }
        if ((st = vk_check_weight(mw, i < MOE_GT_COUNT ? -1 : (i - MOE_GT_COUNT) % MOE_LT_COUNT))) break;
        if (mw->n_dims == 3) {
            uint32_t E = (uint32_t)mw->ne[2];
            wt->experts = 1;
            wt->tbl = tbl_next;
            tbl_next += E;
            if (stream) continue;
            if (mw->expert_bytes + VK_PAD > vk->win_cap) {
                st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: one expert of '%s' (%llu bytes) exceeds a storage window (%llu bytes)", mw->name,
                             (unsigned long long)mw->expert_bytes, (unsigned long long)vk->win_cap);
                break;
            }
            for (uint32_t e = 0; e < E && !st; e++) {
                uint32_t win;
                VkDeviceSize off;
                if (!vk_place(&pl, mw->expert_bytes, &win, &off)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
                tbl[2 * (wt->tbl + e)] = win;
                tbl_off[wt->tbl + e] = off;
            }
            continue;
        }
        int64_t rows = mw->n_dims == 1 ? 1 : mw->ne[1];
        uint64_t rb = mw->n_dims == 1 ? mw->nbytes : mw->row_bytes;
        int64_t per = (int64_t)((vk->win_cap - VK_PAD) / rb);
        if (per < 1) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: a row of '%s' exceeds a storage window", mw->name);
            break;
        }
        wt->part0 = vk->n_parts;
        for (int64_t r0 = 0; r0 < rows && !st; r0 += per) {
            if (vk->n_parts == parts_cap) {
                parts_cap = parts_cap ? 2 * parts_cap : 256;
                vk_part *np = realloc(vk->parts, parts_cap * sizeof *np);
                if (!np) {
                    st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
                    break;
                }
                vk->parts = np;
            }
            vk_part *p = &vk->parts[vk->n_parts++];
            p->row_lo = r0;
            p->row_hi = r0 + per < rows ? r0 + per : rows;
            p->bytes = (VkDeviceSize)(p->row_hi - p->row_lo) * rb;
            if (!vk_place(&pl, p->bytes, &p->win, &p->off)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
            wt->n_parts++;
        }
    }
    if (!st && !stream && vk->gpu_budget) { /* does everything fit the GPU budget? else the experts go to the slot cache */
        uint64_t total = (uint64_t)(n_tbl ? n_tbl : 1) * 8;
        for (uint32_t i = 0; i < pl.n_win; i++) total += vk_align_up(pl.win_used[i], VK_ALIGN);
        if (total > vk->gpu_budget && !n_tbl) {
            st = vk_fail(MOE_ERR_NO_MEMORY, "moe_load: gpu_budget_bytes %llu is below the minimum working set of %llu bytes (%.1f MiB: a model "
                         "without routed experts keeps all its weights resident)", (unsigned long long)vk->gpu_budget,
                         (unsigned long long)total, (double)total / 1048576.0);
            goto done;
        }
        if (total > vk->gpu_budget) {
            stream = 1;
            free(vk->parts);
            vk->parts = NULL;
            vk->n_parts = parts_cap = tbl_next = 0;
            memset(vk->wts, 0, (size_t)n * sizeof *vk->wts);
            memset(tbl, 0, 2 * n_tbl * sizeof *tbl);
            free(pl.win_used);
            vk_placer fresh = {vk->win_cap, 0, 0, NULL, 0, 0};
            pl = fresh;
            goto place;
        }
    }
    /* per layer, the windows of its expert tensors must fit the 8-entry binding; entries become relative */
    for (int l = 0; l < hp->n_layer && !st && !stream; l++) {
        int i0 = MOE_GT_COUNT + l * MOE_LT_COUNT;
        uint32_t lo = UINT32_MAX, hi = 0;
        for (int i = i0; i < i0 + MOE_LT_COUNT; i++)
            for (uint32_t j = vk->wts[i].tbl; vk->wts[i].experts && j < vk->wts[i].tbl + (uint32_t)vk_weight_at(w, i)->ne[2]; j++) {
                lo = tbl[2 * j] < lo ? tbl[2 * j] : lo;
                hi = tbl[2 * j] > hi ? tbl[2 * j] : hi;
            }
        if (lo == UINT32_MAX) continue; /* no experts in this layer */
        if (hi - lo >= VK_XBUFS) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the experts of layer %d span %u storage windows (at most %d)", l, hi - lo + 1, VK_XBUFS);
            break;
        }
        for (int i = i0; i < i0 + MOE_LT_COUNT; i++) {
            if (!vk->wts[i].experts) continue;
            vk->wts[i].win0 = lo;
            for (uint32_t j = vk->wts[i].tbl; j < vk->wts[i].tbl + (uint32_t)vk_weight_at(w, i)->ne[2]; j++) {
                tbl[2 * j] -= lo;
                tbl[2 * j + 1] = (uint32_t)tbl_off[j];
            }
        }
    }
    if (st) goto done;
    /* 2. windows */
    vk->win = calloc(pl.n_win ? pl.n_win : 1, sizeof *vk->win);
    if (!vk->win) {
        st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        goto done;
    }
    for (uint32_t i = 0; i < pl.n_win && !st; i++) {
        st = vk_buf_new(vk, &vk->win[i], vk_align_up(pl.win_used[i], VK_ALIGN), VK_MEM_DEVICE, "weights");
        if (!st) {
            vk->n_win++;
            vk->weight_bytes += vk->win[i].size;
        }
    }
    if (!stream) vk->xc = NULL; /* everything resident: no host tier under it (moe_load frees it) */
    if (!st && stream) st = vk_xg_place(vk, w, tbl, (uint32_t)n_tbl, vk->weight_bytes, (uint64_t)(n_tbl ? n_tbl : 1) * 8);
    if (!st) st = vk_buf_new(vk, &vk->tables, (VkDeviceSize)(n_tbl ? n_tbl : 1) * 8, VK_MEM_DEVICE, "expert tables");
    if (st) goto done;
    /* 3. upload */
    vk_xfer x;
    if ((st = vk_xfer_begin(vk, &x, (VkDeviceSize)32 << 20, 0))) goto done;
    for (int i = 0; i < n; i++) {
        moe_weight *mw = vk_weight_at(w, i);
        vk_wt *wt = &vk->wts[i];
        if (!mw->data) continue;
        mw->dev = wt;
        if (i == MOE_OUTPUT && mw->data == w->g[MOE_TOK_EMBD].data) continue;
        if (wt->experts) {
            for (uint32_t e = 0; e < (uint32_t)mw->ne[2] && !stream; e++) { /* streamed: already at their homes */
                size_t j = wt->tbl + e;
                vk_xfer_copy(&x, (uint8_t *)(uintptr_t)mw->expert_data[e], mw->expert_bytes, vk->win[tbl[2 * j] + wt->win0].buf, tbl[2 * j + 1]);
            }
            continue;
        }
        uint64_t rb = mw->n_dims == 1 ? mw->nbytes : mw->row_bytes;
        for (uint32_t k = 0; k < wt->n_parts; k++) {
            const vk_part *p = &vk->parts[wt->part0 + k];
            vk_xfer_copy(&x, (uint8_t *)(uintptr_t)mw->data + (uint64_t)p->row_lo * rb, p->bytes, vk->win[p->win].buf, p->off);
        }
    }
    vk_xfer_copy(&x, (uint8_t *)tbl, (VkDeviceSize)n_tbl * 8, vk->tables.buf, 0);
    st = vk_xfer_end(&x);
done:
    free(pl.win_used);
    free(tbl);
    free(tbl_off);
    return st;
}

/* ============================================================================================ */
/* 5. pipelines                                                                                  */
/* ============================================================================================ */
#define VK_PC_WORDS 20 /* every dispatch pushes 80 bytes: a superset of each shader's push-constant block */

static double vk_now_s(void);

static const moe_spirv *vk_find_spirv(const char *name) {
    size_t lo = 0, hi = moe_vk_spirv_count;
    while (lo < hi) { /* the table is sorted by name */
        size_t mid = (lo + hi) / 2;
        int c = strcmp(moe_vk_spirv[mid].name, name);
        if (c == 0) return &moe_vk_spirv[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* The pipeline of kernel id with specialization constants 1 = spec & 0xffff (the head size for
   the attention kernels, 0 for kernels without one) and 2 = spec >> 16 (attn.comp's query heads
   per workgroup; left at the shader's default when 0), built on first use (under the backend's lock); *var says which of
   the kernel's variants it is. */
static moe_status vk_pipe(moe_vk_backend *vk, int id, uint32_t spec, VkPipeline *out, int *var) {
    pthread_mutex_lock(&vk->lock);
    moe_status st = MOE_OK;
    int v = 0;
    while (v < VK_VARIANTS && vk->pipes[id][v] && vk->pipe_spec[id][v] != spec) v++;
    char name[48];
    if (id < VKP_ADD) snprintf(name, sizeof name, "%s_%s", k_vk_kind_names[id / VKT_COUNT], k_vk_type_names[id % VKT_COUNT]);
    else snprintf(name, sizeof name, "%s", k_vk_plain[id - VKP_ADD].name);
    if (v == VK_VARIANTS) st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: more than %d variants of the '%s' kernel", VK_VARIANTS, name);
    else if (!vk->pipes[id][v]) {
        uint32_t wg = id < VKP_ADD ? k_vk_kind_wg[id / VKT_COUNT] : k_vk_plain[id - VKP_ADD].wg;
        if (id < VKP_ADD && id / VKT_COUNT == VKK_MV && (spec & 0xffffu)) wg = spec & 0xffffu; /* by use: VK_MV_WG_DENSE, VK_MV_WG_DOWN */
        const moe_spirv *sp = vk_find_spirv(name);
        VkShaderModule mod = 0;
        VkResult r = -13;
        if (sp) {
            VkShaderModuleCreateInfo smi = {VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, NULL, 0, sp->size_bytes, sp->code};
            r = vk->f.CreateShaderModule(vk->dev, &smi, NULL, &mod);
        }
        if (r == VK_SUCCESS) {
            /* constant 0: workgroup size (mv.comp: spec's low 16 bits where set); 1: the head
               size, spec's low 16 bits (attention kernels; others ignore it); 2: spec's high 16
               bits, query heads per workgroup (attn.comp) */
            uint32_t spec_vals[3] = {wg, spec & 0xffffu, spec >> 16};
            VkSpecializationMapEntry me[3] = {{0, 0, 4}, {1, 4, 4}, {2, 8, 4}};
            VkSpecializationInfo si = {spec >> 16 ? 3u : 2u, me, 12, spec_vals};
            VkComputePipelineCreateInfo ci;
            memset(&ci, 0, sizeof ci);
            ci.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
            ci.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
            ci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
            ci.stage.module = mod;
            ci.stage.pName = "main";
            ci.stage.pSpecializationInfo = &si;
            ci.layout = vk->layout;
            ci.basePipelineIndex = -1;
            double t0 = vk_now_s();
            r = vk->f.CreateComputePipelines(vk->dev, vk->pcache, 1, &ci, NULL, &vk->pipes[id][v]);
            vk->t_built += vk_now_s() - t0;
            vk->n_built += r == VK_SUCCESS;
            vk->f.DestroyShaderModule(vk->dev, mod, NULL);
        }
        if (r != VK_SUCCESS) {
            vk->pipes[id][v] = 0;
            st = vk_fail(MOE_ERR_DEVICE, "Vulkan: building the '%s' kernel failed (%s)", name, sp ? vk_result_str(r) : "no such SPIR-V in shaders_embedded.c");
        } else vk->pipe_spec[id][v] = spec;
    }
    *out = v < VK_VARIANTS ? vk->pipes[id][v] : 0;
    *var = v;
    pthread_mutex_unlock(&vk->lock);
    return st;
}

/* ---- pipeline cache ----
   moe's envelope around the driver's blob: magic, version, blob length and an FNV-1a checksum, so
   a damaged or truncated file is refused before the driver parses it; then Vulkan's own header
   (VkPipelineCacheHeaderVersionOne) must name this device (vendor, device, pipelineCacheUUID), so a
   cache of another GPU or driver version is refused too. A refused cache costs compile time only. */
#define VK_PCACHE_MAGIC "MOEPCAC1"
#define VK_PCACHE_VERSION 1u
#define VK_PCACHE_MAX ((size_t)1 << 30)  /* larger input is not a pipeline cache of moe's */
typedef struct vk_pcache_head { char magic[8]; uint32_t version, reserved; uint64_t bytes, checksum; } vk_pcache_head;

/* why the blob cannot be used, or NULL; *vk_data and *vk_bytes: the driver's part */
static const char *vk_pcache_check(const moe_vk_backend *vk, const uint8_t *data, size_t size, const uint8_t **vk_data, size_t *vk_bytes) {
    vk_pcache_head h;
    if (size < sizeof h) return "shorter than its header";
    memcpy(&h, data, sizeof h);
    if (memcmp(h.magic, VK_PCACHE_MAGIC, 8)) return "not a moe pipeline cache (magic)";
    if (h.version != VK_PCACHE_VERSION) return "another version of moe's pipeline cache format";
    if (h.bytes != size - sizeof h) return "truncated or overlong (length field)";
    if (moe_fnv1a(0xcbf29ce484222325ull, data + sizeof h, (size_t)h.bytes) != h.checksum) return "checksum mismatch (damaged)";
    const uint8_t *d = data + sizeof h;
    uint32_t w[4];
    if (h.bytes < 32) return "no Vulkan header";
    memcpy(w, d, sizeof w);
    if (w[0] < 32 || w[0] > h.bytes || w[1] != 1) return "bad Vulkan header (size or version)";
    if (w[2] != vk->props.vendorID || w[3] != vk->props.deviceID || memcmp(d + 16, vk->props.pipelineCacheUUID, 16))
        return "made by another device or driver version (vendor, device or pipelineCacheUUID differ)";
    *vk_data = d;
    *vk_bytes = (size_t)h.bytes;
    return NULL;
}

/* Creates vk->pcache from the blob, else from the file, else empty. Never fails for the cache's
   contents: an unusable one is logged and left out. */
static moe_status vk_pcache_open(moe_vk_backend *vk, const moe_vk_opts *o) {
    uint8_t *file = NULL;
    const uint8_t *in = o ? o->pcache_data : NULL;
    size_t in_size = o ? o->pcache_size : 0;
    const char *src = "the blob";
    if (o && o->pcache_path) {
        if (!(vk->pcache_path = strdup(o->pcache_path))) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of memory");
        if (!in) {
            src = o->pcache_path;
            FILE *fp = fopen(o->pcache_path, "rb");
            long len = -1;
            if (fp && fseek(fp, 0, SEEK_END) == 0) len = ftell(fp);
            if (fp && len > 0 && (size_t)len <= VK_PCACHE_MAX && fseek(fp, 0, SEEK_SET) == 0 && (file = malloc((size_t)len)) &&
                fread(file, 1, (size_t)len, fp) == (size_t)len) {
                in = file;
                in_size = (size_t)len;
            } else if (fp)
                vk_log(vk, MOE_LOG_WARN, "Vulkan: pipeline cache %s ignored: cannot read it (%ld bytes)", src, len);
            else vk_log(vk, MOE_LOG_INFO, "Vulkan: no pipeline cache at %s yet: it is written when the model is freed", src);
            if (fp) fclose(fp);
        }
    }
    const uint8_t *vd = NULL;
    size_t vn = 0;
    if (in) {
        const char *why = vk_pcache_check(vk, in, in_size, &vd, &vn);
        if (why) vk_log(vk, MOE_LOG_WARN, "Vulkan: pipeline cache %s ignored: %s", src, why);
    }
    VkPipelineCacheCreateInfo ci = {VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO, NULL, 0, vn, vd};
    VkResult r = vk->f.CreatePipelineCache(vk->dev, &ci, NULL, &vk->pcache);
    if (r != VK_SUCCESS && vd) { /* the driver refused it after all: start empty */
        vk_log(vk, MOE_LOG_WARN, "Vulkan: pipeline cache %s ignored: the driver refused it (%s)", src, vk_result_str(r));
        vd = NULL;
        vn = 0;
        ci.initialDataSize = 0;
        ci.pInitialData = NULL;
        r = vk->f.CreatePipelineCache(vk->dev, &ci, NULL, &vk->pcache);
    }
    if (vd) {
        vk->pcache_in_bytes = vn;
        vk->pcache_in_sum = moe_fnv1a(0xcbf29ce484222325ull, vd, vn);
        vk_log(vk, MOE_LOG_INFO, "Vulkan: pipeline cache: %zu bytes from %s used", vn, src);
    }
    free(file);
    if (r != VK_SUCCESS) {
        vk->pcache = 0;
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkCreatePipelineCache failed (%s)", vk_result_str(r));
    }
    return MOE_OK;
}

/* The cache in moe's envelope into buf (NULL: size only); call under vk->lock. */
static moe_status vk_pcache_fill(moe_vk_backend *vk, uint8_t *buf, size_t cap, size_t *n_out) {
    size_t vn = 0;
    vk_pcache_head h;
    *n_out = 0;
    VkResult r = vk->pcache ? vk->f.GetPipelineCacheData(vk->dev, vk->pcache, &vn, NULL) : VK_SUCCESS;
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkGetPipelineCacheData failed (%s)", vk_result_str(r));
    *n_out = sizeof h + vn;
    if (!buf || cap < sizeof h + vn)
        return vk_fail(MOE_ERR_BUFFER_TOO_SMALL, "moe_vk_pipeline_cache_get: needs %zu bytes, buffer has %zu", sizeof h + vn, cap);
    if (vn && (r = vk->f.GetPipelineCacheData(vk->dev, vk->pcache, &vn, buf + sizeof h)) != VK_SUCCESS)
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkGetPipelineCacheData failed (%s)", vk_result_str(r));
    memset(&h, 0, sizeof h);
    memcpy(h.magic, VK_PCACHE_MAGIC, 8);
    h.version = VK_PCACHE_VERSION;
    h.bytes = vn;
    h.checksum = moe_fnv1a(0xcbf29ce484222325ull, buf + sizeof h, vn);
    memcpy(buf, &h, sizeof h);
    *n_out = sizeof h + vn;
    return MOE_OK;
}

moe_status moe_vk_pcache_get(moe_vk_backend *vk, void *buf, size_t cap, size_t *n_out) {
    pthread_mutex_lock(&vk->lock); /* pipelines are added under it */
    moe_status st = vk_pcache_fill(vk, buf, cap, n_out);
    pthread_mutex_unlock(&vk->lock);
    return st;
}

/* Writes the cache to vk->pcache_path if it changed (temporary file + rename: a reader sees the
   old file or the new one, never half of one), then destroys it. Failures only log: freeing goes on. */
static void vk_pcache_close(moe_vk_backend *vk) {
    if (!vk->pcache) return;
    if (vk->n_built)
        vk_log(vk, MOE_LOG_INFO, "Vulkan: %d pipeline(s) created in %.1f ms%s", vk->n_built, vk->t_built * 1e3,
               vk->pcache_in_bytes ? " (with the pipeline cache)" : "");
    size_t n = 0;
    uint8_t *blob = NULL;
    if (vk->pcache_path && vk_pcache_fill(vk, NULL, 0, &n) == MOE_ERR_BUFFER_TOO_SMALL && (blob = malloc(n)) &&
        vk_pcache_fill(vk, blob, n, &n) == MOE_OK) {
        const vk_pcache_head *h = (const void *)blob;
        if (h->bytes != vk->pcache_in_bytes || h->checksum != vk->pcache_in_sum) {
            size_t pl = strlen(vk->pcache_path);
            char *tmp = malloc(pl + 32);
            FILE *fp = NULL;
            if (tmp) snprintf(tmp, pl + 32, "%s.tmp.%lu", vk->pcache_path, (unsigned long)VK_PID());
            int ok = tmp && (fp = fopen(tmp, "wb")) && fwrite(blob, 1, n, fp) == n;
            if (fp && fclose(fp) != 0) ok = 0;
            if (ok) ok = VK_RENAME(tmp, vk->pcache_path);
            if (ok) vk_log(vk, MOE_LOG_INFO, "Vulkan: pipeline cache: %zu bytes written to %s", n, vk->pcache_path);
            else {
                vk_log(vk, MOE_LOG_WARN, "Vulkan: pipeline cache: cannot write %s", vk->pcache_path);
                if (tmp) remove(tmp);
            }
            free(tmp);
        }
    }
    free(blob);
    vk->f.DestroyPipelineCache(vk->dev, vk->pcache, NULL);
    vk->pcache = 0;
}

void moe_vk_free(moe_vk_backend *vk) {
    if (!vk) return;
    vk_fns *f = &vk->f;
    if (vk->dev) { /* resources exist only if every device entry point loaded; the device itself may not */
        if (vk->host && f->QueueWaitIdle && vk->queue) { /* the host's device may be busy with its own work: wait for ours only */
            pthread_mutex_lock(&vk->lock);
            if (vk->queue_lock) vk->queue_lock(vk->queue_lock_user, 1);
            f->QueueWaitIdle(vk->queue);
            if (vk->queue_lock) vk->queue_lock(vk->queue_lock_user, 0);
            pthread_mutex_unlock(&vk->lock);
        } else if (!vk->host && f->DeviceWaitIdle) f->DeviceWaitIdle(vk->dev);
        vk_pcache_close(vk);
        vk_xg_free(vk);
        for (int i = 0; i < VKP_COUNT; i++)
            for (int v = 0; v < VK_VARIANTS; v++)
                if (vk->pipes[i][v]) f->DestroyPipeline(vk->dev, vk->pipes[i][v], NULL);
        if (vk->layout) f->DestroyPipelineLayout(vk->dev, vk->layout, NULL);
        if (vk->dsl) f->DestroyDescriptorSetLayout(vk->dev, vk->dsl, NULL);
        for (uint32_t i = 0; i < vk->n_win; i++) vk_buf_free(vk, &vk->win[i]);
        vk_buf_free(vk, &vk->tables);
        vk_buf_free(vk, &vk->dummy);
        if (f->DestroyDevice && !vk->host) f->DestroyDevice(vk->dev, NULL);
    }
    free(vk->pcache_path);
    if (vk->messenger && f->DestroyDebugUtilsMessengerEXT) f->DestroyDebugUtilsMessengerEXT(vk->inst, vk->messenger, NULL);
    if (vk->inst && !vk->inst_shared && !vk->host && f->DestroyInstance) f->DestroyInstance(vk->inst, NULL);
    /* the loader stays loaded: some drivers do not survive being unloaded and loaded again */
    if (vk->w)
        for (uint32_t i = 0; i < vk->n_wts; i++) vk_weight_at(vk->w, (int)i)->dev = NULL;
    if (vk->lock_ok) pthread_mutex_destroy(&vk->lock);
    free(vk->win);
    free(vk->parts);
    free(vk->wts);
    free(vk);
}

moe_status moe_vk_init(const moe_weights *w, int32_t device_index, int32_t gpu_only, moe_log_fn log, void *log_user,
                       moe_vk_backend **out) {
    return moe_vk_init_budget(w, device_index, gpu_only, 0, log, log_user, out);
}

moe_status moe_vk_init_budget(const moe_weights *w, int32_t device_index, int32_t gpu_only, uint64_t gpu_budget_bytes, moe_log_fn log,
                              void *log_user, moe_vk_backend **out) {
    return moe_vk_init_opts(w, device_index, gpu_only, gpu_budget_bytes, NULL, log, log_user, out);
}

moe_status moe_vk_init_opts(const moe_weights *w, int32_t device_index, int32_t gpu_only, uint64_t gpu_budget_bytes,
                            const moe_vk_opts *opts, moe_log_fn log, void *log_user, moe_vk_backend **out) {
    moe_xcache *xc = opts ? opts->xc : NULL;
    if (!out) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_init: out is NULL");
    *out = NULL;
    if (!w || device_index < 0) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_init: bad arguments");
    const moe_hparams *hp = &w->hp;
    if (hp->n_expert > VK_MAX_EXPERTS || hp->n_expert_used > VK_MAX_TOPK || hp->n_embd % 16)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: model shape not supported by the kernels (experts <= %d, top-k <= %d, embedding width a "
                       "multiple of 16)", VK_MAX_EXPERTS, VK_MAX_TOPK);
    for (int l = 0; l < hp->n_layer; l++) { /* what each layer's plan asks of the kernels */
        const moe_layer_plan *p = &w->layers[l].p;
        const char *why = NULL;
        if (p->attn_kind == MOE_ATTN_DELTANET) {
            if (p->dn.k_dim > 256 || p->dn.conv_k > 16) why = "Gated DeltaNet key heads above 256 or a conv above 16 taps";
            else if ((2 * p->dn.n_k_head * p->dn.k_dim) % 16 || (p->dn.n_v_head * p->dn.v_dim) % 16)
                why = "Gated DeltaNet widths not a multiple of 16";
        } else if (p->attn_kind != MOE_ATTN_FULL && p->attn_kind != MOE_ATTN_SLIDING) why = "this attention kind does not run on Vulkan yet";
        else if (p->attn.head_dim > 512 || p->attn.head_dim % 8) why = "head size above 512 or not a multiple of 8";
        if (!why && p->ffn_kind != MOE_FFN_MOE && p->ffn_kind != MOE_FFN_DENSE && p->ffn_kind != MOE_FFN_MOE_DENSE && p->ffn_kind != MOE_FFN_MOE_SHARED)
            why = "this FFN kind does not run on Vulkan yet";
        else if (!why && (p->n_ff_exp % 16 || p->n_ff % 16 || p->n_ff_shexp % 16)) why = "FFN width not a multiple of 16";
        else if (!why && p->act != MOE_ACT_SILU && p->act != MOE_ACT_GELU_TANH) why = "this activation does not run on Vulkan yet";
        if (why) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: layer %d: %s", l, why);
    }
    moe_vk_backend *vk = calloc(1, sizeof *vk);
    if (!vk) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of memory");
    vk->log = log;
    vk->log_user = log_user;
    vk->gpu_budget = gpu_budget_bytes;
    vk->xc = xc;
    if (pthread_mutex_init(&vk->lock, NULL) != 0) {
        free(vk);
        return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: cannot create a mutex");
    }
    vk->lock_ok = 1;
    moe_status st;
    if (opts && opts->host) { /* the host's instance and device: nothing of ours on that level */
        if ((st = vk_adopt_host(vk, opts->host))) goto fail;
    } else {
        const char *why = vk_load_global(&vk->f, &vk->lib);
        if (why) {
            st = vk_fail(MOE_ERR_DEVICE, "Vulkan: %s", why);
            goto fail;
        }
        if ((st = vk_create_instance(vk))) goto fail;
        if ((st = vk_create_device(vk, device_index, gpu_only))) goto fail;
    }
    if ((st = vk_pcache_open(vk, opts))) goto fail;
    VkDescriptorSetLayoutBinding b[8];
    for (uint32_t i = 0; i < 8; i++) {
        VkDescriptorSetLayoutBinding bi = {i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, i == 6 ? VK_XBUFS : 1, VK_SHADER_STAGE_COMPUTE_BIT, NULL};
        b[i] = bi;
    }
    VkDescriptorSetLayoutCreateInfo dli = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO, NULL,
                                           VK_DESCRIPTOR_SET_LAYOUT_CREATE_PUSH_DESCRIPTOR_BIT_KHR, 8, b};
    VkResult r = vk->f.CreateDescriptorSetLayout(vk->dev, &dli, NULL, &vk->dsl);
    VkPushConstantRange pcr = {VK_SHADER_STAGE_COMPUTE_BIT, 0, 4 * VK_PC_WORDS};
    VkPipelineLayoutCreateInfo pli = {VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, NULL, 0, 1, &vk->dsl, 1, &pcr};
    if (r == VK_SUCCESS) r = vk->f.CreatePipelineLayout(vk->dev, &pli, NULL, &vk->layout);
    if (r != VK_SUCCESS) {
        st = vk_fail(MOE_ERR_DEVICE, "Vulkan: creating the pipeline layout failed (%s)", vk_result_str(r));
        goto fail;
    }
    if ((st = vk_buf_new(vk, &vk->dummy, VK_ALIGN, VK_MEM_DEVICE, "a filler buffer"))) goto fail;
    vk->w = w;
    if ((st = vk_upload_weights(vk, w))) goto fail;
    vk_log(vk, MOE_LOG_INFO, "Vulkan: %.1f MiB of weights in %u buffer(s) of at most %.0f MiB%s", (double)vk->weight_bytes / 1048576.0,
           vk->n_win, (double)vk->win_cap / 1048576.0, vk->coopmat ? "; prefill matmuls on cooperative matrices" : "");
    *out = vk;
    return MOE_OK;
fail:
    moe_vk_free(vk);
    return st;
}

/* ============================================================================================ */
/* 6. contexts and steps                                                                         */
/* ============================================================================================ */
#define VK_NB 6               /* bindings 0..5 of a record; 6 = weights, 7 = step buffer */
#define VK_CACHE 4            /* command buffers kept for replay */
#define VK_REC_COPY 0xffff    /* record kind: a buffer copy instead of a dispatch */
#define VK_REC_FILL 0xfffe    /* record kind: zeros into binding 1's range */
#define VK_MV_MAX 8           /* up to this many tokens (columns), matmuls are matrix-vector kernels */
#define VK_MV_ROWS 2          /* output rows per matrix-vector workgroup (mv.comp RW) */
/* mv.comp's workgroup size by use (the kernel table's 64 otherwise). Measured on an H100 over
   the Qwen3-30B shape (tg, ms/token in 8 layers at 32 / 64 / 128 / 256 threads): dense q/k/v/o
   0.548 / 0.456 / 0.383 / 0.456, expert down (8 experts' runs flattened) 0.269 / 0.256 / 0.241 /
   0.150, expert gate+up 0.576 / 0.256 / 0.316 / 0.467, lm head 0.366 / 0.394 / 0.466 / 0.668 */
#define VK_MV_WG_DENSE 128
#define VK_MV_WG_DOWN 256
#define VK_DN_CT 64           /* chunk of the chunked delta rule (dn_chunk.glsl DN_CT) */
#define VK_DN_DT 16           /* state columns per workgroup of dn_chunk_state.comp (DT) */
#define VK_DN_CHUNK_MIN 64    /* ops of this many tokens or more take the chunked delta rule */
/* Split-KV decode attention (attn.comp -DSPLIT). The single-workgroup kernel walks a head's keys
   32 at a time with 3 barriers each, about a microsecond per block on a big GPU however few
   workgroups run: with one workgroup per KV group (4 for Qwen3-30B, each serving its 8 query
   heads) a decode token at 512 keys kept 4 SMs busy for 16 serial blocks. So a decode token
   whose one-workgroup grid is small (<= VK_SPLIT_TARGET / 4 workgroups) splits its range once
   it exceeds VK_SPLIT_MIN keys (4 blocks), any other decode token above VK_SPLIT_LONG keys:
   chunks of VK_SPLIT_CHUNK keys, halved down to one block while the grid stays below
   VK_SPLIT_TARGET, one workgroup each; the last workgroup of a group to finish merges the
   chunks (no second dispatch). A split chunk costs one block plus its share of the merge
   (reading 2 + head_dim floats per head), so below 4 blocks the serial walk is as fast, and the
   short contexts (every regression dump: <= 48 keys) keep the one-workgroup kernel's bits. */
#ifndef VK_SPLIT_MIN /* (a test may raise it to compare against the one-workgroup kernel) */
#define VK_SPLIT_MIN 128
#endif
#define VK_SPLIT_LONG 512
#define VK_SPLIT_CHUNK 256    /* a multiple of attn.comp's key block (32) */
#define VK_SPLIT_CHUNK_MIN 32 /* chunks shrink down to one key block while the grid is small ... */
#define VK_SPLIT_TARGET 256   /* ... fewer workgroups than this (an H100 has 132 SMs) */
#define VK_SPLIT_MAX 64       /* attn.comp MAX_SPLIT */
/* query heads of one KV group per attn.comp workgroup, at most: its registers grow by about
   6·GW + GW·ND floats, its shared memory to GW·(4·HD + 648) + 1 KiB bytes, 22.5 KiB at head
   size 512, inside the 32 KiB every device moe runs on has */
#define VK_ATTN_GW 8
/* Tiled prefill attention (attn_tile.comp): a step of more than VK_TILE_MIN tokens, head size
   32, 64 or 128 (its thread layout: head_dim / 4 threads per query row), runs blocks of 16
   queries against shared-memory tiles of 32 keys; shorter steps keep
   attn.comp and its bits: every committed fixture (Qwen3 128 tokens, Gemma 4 64, the 48-token
   regression dumps) and chunked prefills. Up to 128 tokens the one-workgroup-per-query kernel
   has n_head · n workgroups walking at most 128 keys, so little is left to gain there. */
#ifndef VK_TILE_MIN
#define VK_TILE_MIN 128
#endif
#define VK_TILE_Q 16          /* attn_tile.comp BQ */

/* profiling classes */
enum { VKC_EMBED, VKC_NORM, VKC_MV, VKC_MV_GATEUP, VKC_MV_DOWN, VKC_MM, VKC_MM_GATEUP, VKC_MM_DOWN, VKC_LMHEAD, VKC_ROPE,
       VKC_KVSTORE, VKC_ATTN, VKC_ADD, VKC_TOPK, VKC_ROUTE, VKC_SORT, VKC_COMBINE, VKC_COPY, VKC_ELTWISE, VKC_COUNT };
static const char *const k_vkc_names[VKC_COUNT] = {"embed", "rmsnorm", "matvec", "expert gate+up matvec", "expert down matvec",
    "matmul", "expert gate+up matmul", "expert down matmul", "lm head", "qk-norm/rope", "kv store", "attention", "add",
    "router top-k", "route (router + top-k)", "expert sort", "expert combine", "copy", "elementwise"};

/* One dispatch (or copy) as an op recorded it. Records are compared byte for byte to find a cached
   command buffer, so every record is zeroed before it is filled. */
typedef struct vk_rec {
    uint16_t pipe;             /* VKP_*, VK_REC_COPY or VK_REC_FILL */
    uint8_t kind;              /* VKC_* */
    uint8_t wmask;             /* which of bindings 0..5 the kernel writes */
    uint8_t wmode;             /* binding 6: 0 filler, 1 one dense part (win, woff, wrange), 2 windows win .. win+7 */
    uint8_t var;               /* pipeline variant (vk_pipe) */
    uint16_t slot;             /* binding 7: 0 the whole step buffer; s > 0 the header of batch segment s - 1 */
    uint32_t win;
    uint32_t grid[3];
    VkDeviceSize woff, wrange;
    VkBuffer buf[VK_NB];
    VkDeviceSize off[VK_NB], range[VK_NB];
    uint32_t pc[VK_PC_WORDS];
} vk_rec;

typedef struct vk_cached { int n; vk_rec *recs; VkCommandBuffer cb; uint64_t used; } vk_cached;

typedef struct vk_ctx {
    moe_vk_backend *vk;
    const moe_weights *w;
    moe_ctx_shape shape;
    int kv_f16, profile, serial;
    vk_buf act[ACT_COUNT];
    vk_buf h, p, aux;          /* MoE: hidden [nb·k][ff], expert outputs [nb·k][D], routing scratch (u32) */
    vk_buf split;              /* split-KV decode attention partials (n_head · VK_SPLIT_MAX rows of head_dim, then their (m, l) pairs: attn.comp), then arrival counters (vk_split_counters) */
    uint32_t ids_off, w_off, list_off, pos_off, items_off, max_items;
    uint32_t cnt_off;          /* route_mv.comp's arrival counters, one per decode token (zero between dispatches) */
    vk_buf kc, vc;             /* the KV caches one after the other, f16 or f32 */
    VkDeviceSize *kv_off, *kv_size; /* [n_cache] byte offset and (aligned) size of cache c */
    int32_t *kv_rows;          /* [n_cache] rows of cache c */
    struct vk_rope_tab { moe_rope r; vk_buf tab; } rope[VK_MAX_ROPES]; /* per distinct rope of the layers: [n_ctx][n_rot/2] (cos, sin) */
    int n_rope;
    vk_buf step;               /* host-visible: [0] pos0, [1] n, [4 + i] token i; then n_batch segment
                                  headers [pos0, n] at seg_base + s · seg_stride (moe_step_batch) */
    VkDeviceSize seg_base, seg_stride;
    /* moe_step_batch (section 8): the pass's segments while this context leads one, and the one
       its ops are aimed at now (cur_slot = its index + 1; 0 = none) */
    const moe_vk_seg *bseg;
    int n_bseg;
    uint16_t cur_slot;
    uint64_t frees_seen;       /* vk->ctx_frees when the cached command buffers were last known valid */
    vk_buf logits;             /* host-visible readback of ACT_LOGITS */
    VkCommandPool pool;
    VkFence fence;
    VkQueryPool qpool;
    uint32_t q_cap;
    vk_rec *recs;
    int n_recs, cap_recs;
    vk_cached cache[VK_CACHE];
    uint64_t tick;
    int step_n, step_pos0, have_pos0, dead;
    int logits_cap;            /* rows ACT_LOGITS holds: one storage binding's worth at most */
    int route_n, route_k;      /* the last route op: tokens, experts per token */
    int fuse_idx, fuse_role, fuse_rows, fuse_acc; /* the last record, if it may absorb a residual add */
    /* a decode-size RMSNorm not dispatched yet: matrix-vector consumers apply it on the fly, the
       first of them also writes dst (done); anything else that needs dst, or that overwrites dst
       or src, makes it a real dispatch first (vk_pn_touch) */
    struct { int active, done, dst, src, rows, width; const moe_weight *w; float eps; } pn;
    moe_status err;
    char errmsg[400];
    double prof_ns[2][VKC_COUNT][VKP_COUNT + 1];
    uint32_t prof_n[2][VKC_COUNT][VKP_COUNT + 1];
    uint64_t prof_steps[2], prof_tokens[2];
    uint64_t expert_evals;     /* (token, expert) pairs run, counted when a step completes */
    uint64_t step_evals;
    double prof_total[2];
    double prof_bytes[2][VKC_COUNT][VKP_COUNT + 1], prof_flops[2][VKC_COUNT][VKP_COUNT + 1];
    int prof_env;              /* MOE_VK_PROFILE: log the profile when the context is freed */
    double (*rec_cost)[2];     /* [cap_recs] bytes and flops of each record of the step (profiling) */
    int cap_cost;
    /* GPU expert slot cache: the step's routed ids per layer (host-visible), pairs logged per layer */
    vk_buf rlog;
    int32_t *xg_n;
    uint32_t xg_stride;        /* u32 per layer in rlog: n_batch · k */
    uint64_t xg_hits, xg_misses, xg_bytes;
    /* over a host tier: the step goes to the queue in segments, one ending at each MoE layer's route op */
    VkCommandBuffer seg_cb;
    int seg0;                  /* first record of the step not submitted yet */
    int locked;                /* this context holds the model's step_mu */
    struct vk_xf { VkBuffer src, dst; VkBufferCopy cp; } *xf; /* copies that open the next segment: stage -> slots, table */
    int n_xf;
    int32_t *xg_ids, *xg_pairs; /* [E] scratch: a layer's missed experts, their pairs */
    uint8_t *xg_pred;          /* [L][E] experts prefetched for a layer (1), judged at its route op (moe_xs_judge) */
    uint8_t **xg_dst;          /* [E][MOE_XS_MAX_T] where their slabs go in the stage */
    moe_xs_counts xcnt;        /* the host tier's counters for this context */
    /* hybrid models: the live recurrent states and n_ckpt checkpoint copies of them; each state's
       conv rows and delta-rule matrix at aligned offsets (st_conv, st_rec) of st_bytes */
    vk_buf st, ck;
    VkDeviceSize *st_conv, *st_rec, st_bytes;
    int n_ckpt;
    /* the chunked (WY) delta rule: ops of at least dn_chunk_min tokens (0 = never) take it, with
       its scratch (dn_chunk.glsl's layout for n_batch tokens) */
    int dn_chunk_min;
    vk_buf dn_scr;
    /* submissions: each command buffer timestamps its start and end in tpool (2 queries), for
       moe_ctx_submit_times and for the cost scale that splits a chunk under max_submit_us */
    VkQueue queue;             /* vk->queue, or vk->queue_low for a low_priority context */
    VkQueryPool tpool;
    VkCommandBuffer split_cb;  /* the parts of a split chunk, one after the other */
    uint64_t sub_n;
    double sub_max_ns, sub_total_ns;
    double ns_per_unit[2];     /* GPU ns per cost unit (vk_units), prefill and decode, calibrated */
} vk_ctx;
static moe_status vk_xg_after_step(vk_ctx *c);
static void vk_xg_log_route(vk_ctx *c, const vk_wt *wg, int n);
static void vk_xg_route_sync(vk_ctx *c, const vk_wt *wg, int n);
/* the GPU slot cache over a host tier: the route op syncs with the host */
static int vk_tiered(const moe_vk_backend *vk) { return vk->xg && vk->xc; }

static void vk_pn_flush(vk_ctx *c);
static void vk_pn_touch(vk_ctx *c, unsigned rd, unsigned wr);

/* the first failure of a step sticks; end_step reports it */
static void vk_ctx_fail(vk_ctx *c, moe_status st, const char *fmt, ...) {
    if (c->err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof c->errmsg, fmt, ap);
    va_end(ap);
    c->err = st;
}

/* a new zeroed record of kernel pipe (variant spec, see vk_pipe), or NULL after a failure */
/* the variant of a recorded kernel's pipeline (built on first use); -1 with the step failed */
static int vk_rec_var(vk_ctx *c, int pipe, uint32_t spec) {
    VkPipeline pl;
    int var = 0;
    moe_status st = vk_pipe(c->vk, pipe, spec, &pl, &var);
    if (st) {
        vk_ctx_fail(c, st, "%s", moe_last_error());
        return -1;
    }
    return var;
}

static vk_rec *vk_rec_new_spec(vk_ctx *c, int pipe, uint32_t spec, int kind) {
    if (c->err) return NULL;
    if (c->n_recs == c->cap_recs) {
        int nc = c->cap_recs ? 2 * c->cap_recs : 1024;
        vk_rec *nr = realloc(c->recs, (size_t)nc * sizeof *nr);
        if (!nr) {
            vk_ctx_fail(c, MOE_ERR_NO_MEMORY, "Vulkan: out of host memory recording a step");
            return NULL;
        }
        c->recs = nr;
        c->cap_recs = nc;
    }
    int var = pipe < VK_REC_FILL ? vk_rec_var(c, pipe, spec) : 0;
    if (var < 0) return NULL;
    if (c->cap_cost < c->cap_recs) {
        double(*nc)[2] = realloc(c->rec_cost, (size_t)c->cap_recs * sizeof *nc);
        if (!nc) {
            vk_ctx_fail(c, MOE_ERR_NO_MEMORY, "Vulkan: out of host memory recording a step");
            return NULL;
        }
        c->rec_cost = nc;
        c->cap_cost = c->cap_recs;
    }
    c->rec_cost[c->n_recs][0] = c->rec_cost[c->n_recs][1] = 0;
    vk_rec *r = &c->recs[c->n_recs++];
    memset(r, 0, sizeof *r);
    r->pipe = (uint16_t)pipe;
    r->var = (uint8_t)var;
    r->kind = (uint8_t)kind;
    r->slot = c->cur_slot;
    return r;
}

static vk_rec *vk_rec_new(vk_ctx *c, int pipe, int kind) { return vk_rec_new_spec(c, pipe, 0, kind); }

/* profiling: the bytes the last record's kernel reads and writes, and its flops */
static void vk_cost(vk_ctx *c, double bytes, double flops) {
    if (c->n_recs <= 0 || c->err) return;
    c->rec_cost[c->n_recs - 1][0] += bytes;
    c->rec_cost[c->n_recs - 1][1] += flops;
}

static void vk_bind(vk_rec *r, int slot, const vk_buf *b, int written) {
    r->buf[slot] = b->buf;
    r->off[slot] = b->off;
    r->range[slot] = b->size;
    if (written) r->wmask |= (uint8_t)(1u << slot);
}

static void vk_bind_range(vk_rec *r, int slot, VkBuffer buf, VkDeviceSize off, VkDeviceSize range, int written) {
    r->buf[slot] = buf;
    r->off[slot] = off;
    r->range[slot] = range;
    if (written) r->wmask |= (uint8_t)(1u << slot);
}

/* grid of n workgroups over x (folded into z beyond the x limit) */
static void vk_grid_fold(vk_rec *r, uint64_t n, uint32_t y) {
    uint64_t x = n < 65535 ? n : 65535;
    r->grid[0] = (uint32_t)(x ? x : 1);
    r->grid[1] = y;
    r->grid[2] = (uint32_t)((n + r->grid[0] - 1) / r->grid[0]);
    if (!r->grid[2]) r->grid[2] = 1;
}

/* ---- turning records into commands ---- */
/* What ran since the last barrier wrote and read, as byte ranges of buffers: records that touch
   disjoint rows of one buffer (moe_step_batch's segments) need no barrier between them. A copy's
   destination (range 0) counts to the end of its buffer. */
typedef struct vk_span { VkBuffer b; VkDeviceSize lo, hi; } vk_span;
#define VK_HZ_WR 64
#define VK_HZ_RD 128
typedef struct vk_hazard { vk_span wr[VK_HZ_WR], rd[VK_HZ_RD]; int n_wr, n_rd; } vk_hazard;

static vk_span vk_span_of(const vk_rec *r, int s) {
    VkDeviceSize lo = r->off[s], n = r->range[s];
    vk_span v = {r->buf[s], lo, n == 0 || n == VK_WHOLE_SIZE ? ~(VkDeviceSize)0 : lo + n};
    return v;
}

static int vk_in(const vk_span *set, int n, vk_span v) {
    for (int i = 0; i < n; i++)
        if (set[i].b == v.b && v.lo < set[i].hi && set[i].lo < v.hi) return 1;
    return 0;
}

/* adds v to the set, merged into an entry it overlaps or touches; 0 when the set is full */
static int vk_span_add(vk_span *set, int *n, int cap, vk_span v) {
    for (int i = 0; i < *n; i++)
        if (set[i].b == v.b && v.lo <= set[i].hi && set[i].lo <= v.hi) {
            if (v.lo < set[i].lo) set[i].lo = v.lo;
            if (v.hi > set[i].hi) set[i].hi = v.hi;
            return 1;
        }
    if (*n == cap) return 0;
    set[(*n)++] = v;
    return 1;
}

static int vk_hazard_add(vk_hazard *h, const vk_rec *r) {
    for (int s = 0; s < VK_NB; s++) {
        if (!r->buf[s]) continue;
        vk_span v = vk_span_of(r, s);
        if (((r->wmask >> s) & 1) && !vk_span_add(h->wr, &h->n_wr, VK_HZ_WR, v)) return 0;
        if (!vk_span_add(h->rd, &h->n_rd, VK_HZ_RD, v)) return 0;
    }
    return 1;
}

/* does r read what ran since the last barrier wrote, or overwrite what it read or wrote? */
static int vk_need_barrier(vk_hazard *h, const vk_rec *r) {
    int need = 0;
    for (int s = 0; s < VK_NB && !need; s++) {
        if (!r->buf[s]) continue;
        vk_span v = vk_span_of(r, s);
        if (vk_in(h->wr, h->n_wr, v)) need = 1;
        if (((r->wmask >> s) & 1) && vk_in(h->rd, h->n_rd, v)) need = 1;
    }
    if (!need && vk_hazard_add(h, r)) return 0;
    h->n_wr = h->n_rd = 0;
    vk_hazard_add(h, r);
    return 1;
}

static void vk_cmd_barrier(const vk_fns *f, VkCommandBuffer cb) {
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
                          VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    VkFlags st = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT;
    f->CmdPipelineBarrier(cb, st, st, 0, 1, &mb, 0, NULL, 0, NULL);
}

static moe_status vk_record_cb(vk_ctx *c, VkCommandBuffer cb, const vk_rec *recs, int n) {
    moe_vk_backend *vk = c->vk;
    const vk_fns *f = &vk->f;
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO, NULL, 0, NULL};
    VkResult r = f->ResetCommandBuffer(cb, 0);
    if (r == VK_SUCCESS) r = f->BeginCommandBuffer(cb, &bi);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkBeginCommandBuffer failed (%s)", vk_result_str(r));
    int prof = c->profile && c->qpool && (uint32_t)n + 1 <= c->q_cap; /* over a host tier: each segment of the step */
    if (c->tpool) {
        f->CmdResetQueryPool(cb, c->tpool, 0, 2);
        f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, c->tpool, 0);
    }
    if (prof) {
        f->CmdResetQueryPool(cb, c->qpool, 0, (uint32_t)n + 1);
        f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, c->qpool, 0);
    }
    /* the host wrote the step buffer (tokens, position) before the submit: covered by the submit.
       Device writes of earlier submissions (KV cache, kv_load copies) become visible here. */
    vk_cmd_barrier(f, cb);
    if (c->n_xf) { /* over a host tier: the layer's experts into their slots and its table entries, before its kernels */
        for (int i = 0; i < c->n_xf; i++) f->CmdCopyBuffer(cb, c->xf[i].src, c->xf[i].dst, 1, &c->xf[i].cp);
        c->n_xf = 0;
        vk_cmd_barrier(f, cb);
    }
    vk_hazard hz;
    hz.n_wr = hz.n_rd = 0;
    VkPipeline bound = 0;
    for (int i = 0; i < n; i++) {
        const vk_rec *rc = &recs[i];
        if (vk_need_barrier(&hz, rc) || prof || c->serial) vk_cmd_barrier(f, cb);
        if (rc->pipe == VK_REC_COPY) {
            VkBufferCopy cp = {rc->off[0], rc->off[1], rc->range[0]};
            f->CmdCopyBuffer(cb, rc->buf[0], rc->buf[1], 1, &cp);
        } else if (rc->pipe == VK_REC_FILL) {
            f->CmdFillBuffer(cb, rc->buf[1], rc->off[1], rc->range[1], 0);
        } else {
            VkPipeline pl = vk->pipes[rc->pipe][rc->var];
            if (pl != bound) {
                f->CmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pl);
                bound = pl;
            }
            VkDescriptorBufferInfo bufs[VK_NB + VK_XBUFS + 1];
            VkWriteDescriptorSet wr[8];
            for (int s = 0; s < VK_NB; s++) {
                VkDescriptorBufferInfo d = {rc->buf[s] ? rc->buf[s] : vk->dummy.buf, rc->buf[s] ? rc->off[s] : 0,
                                            rc->buf[s] ? rc->range[s] : VK_WHOLE_SIZE};
                bufs[s] = d;
            }
            for (int j = 0; j < VK_XBUFS; j++) {
                VkDescriptorBufferInfo d = {vk->dummy.buf, 0, VK_WHOLE_SIZE};
                if (rc->wmode == 1 && j == 0) {
                    d.buffer = vk->win[rc->win].buf;
                    d.offset = rc->woff;
                    d.range = rc->wrange;
                } else if (rc->wmode == 2 && rc->win + (uint32_t)j < vk->n_win)
                    d.buffer = vk->win[rc->win + (uint32_t)j].buf;
                bufs[VK_NB + j] = d;
            }
            VkDescriptorBufferInfo sd = {c->step.buf, rc->slot ? c->seg_base + (VkDeviceSize)(rc->slot - 1) * c->seg_stride : 0,
                                         rc->slot ? c->seg_stride : VK_WHOLE_SIZE};
            bufs[VK_NB + VK_XBUFS] = sd;
            for (int b = 0; b < 8; b++) {
                VkWriteDescriptorSet w = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, NULL, 0, (uint32_t)b, 0, b == 6 ? VK_XBUFS : 1,
                                          VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, NULL, &bufs[b < 6 ? b : b == 6 ? VK_NB : VK_NB + VK_XBUFS], NULL};
                wr[b] = w;
            }
            f->CmdPushDescriptorSetKHR(cb, VK_PIPELINE_BIND_POINT_COMPUTE, vk->layout, 0, 8, wr);
            f->CmdPushConstants(cb, vk->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, 4 * VK_PC_WORDS, rc->pc);
            f->CmdDispatch(cb, rc->grid[0], rc->grid[1], rc->grid[2]);
        }
        if (prof) f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->qpool, (uint32_t)i + 1);
    }
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_SHADER_WRITE_BIT,
                          VK_ACCESS_HOST_READ_BIT};
    f->CmdPipelineBarrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1,
                          &mb, 0, NULL, 0, NULL);
    if (c->tpool) f->CmdWriteTimestamp(cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, c->tpool, 1);
    r = f->EndCommandBuffer(cb);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: vkEndCommandBuffer failed (%s)", vk_result_str(r));
    return MOE_OK;
}

/* ---- profiling: GPU time per (class, kernel), prefill and decode steps apart ---- */
/* the timestamps of records i0 .. i0 + n - 1 of the step, just run as one command buffer (the whole
   step, or over a host tier one segment of it: end says it was the step's last) */
static void vk_prof_collect(vk_ctx *c, int i0, int n, int end) {
    moe_vk_backend *vk = c->vk;
    const vk_rec *recs = c->recs + i0;
    if (!c->profile || !c->qpool || (uint32_t)n + 1 > c->q_cap) return;
    uint64_t *t = malloc(((size_t)n + 1) * sizeof *t);
    if (!t) return;
    VkResult r = vk->f.GetQueryPoolResults(vk->dev, c->qpool, 0, (uint32_t)n + 1, ((size_t)n + 1) * 8, t, 8,
                                           VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT);
    if (r == VK_SUCCESS) {
        int ph = c->step_n > 1 ? 0 : 1;
        for (int i = 0; i < n; i++) {
            double ns = (double)((t[i + 1] - t[i]) & vk->ts_mask) * vk->ts_ns;
            int p = recs[i].pipe >= VK_REC_FILL ? VKP_COUNT : recs[i].pipe;
            c->prof_ns[ph][recs[i].kind][p] += ns;
            c->prof_n[ph][recs[i].kind][p]++;
            c->prof_bytes[ph][recs[i].kind][p] += c->rec_cost[i0 + i][0];
            c->prof_flops[ph][recs[i].kind][p] += c->rec_cost[i0 + i][1];
        }
        if (end) {
            c->prof_steps[ph]++;
            c->prof_tokens[ph] += (uint64_t)c->step_n;
        }
        c->prof_total[ph] += (double)((t[n] - t[0]) & vk->ts_mask) * vk->ts_ns;
    }
    free(t);
}

static void vk_prof_report(vk_ctx *c) {
    for (int ph = 0; ph < 2; ph++) {
        if (!c->prof_steps[ph]) continue;
        double tot = c->prof_total[ph];
        vk_log(c->vk, MOE_LOG_INFO, "vk profile, %s: %llu steps, %llu tokens, GPU %.3f ms (%.3f ms/step), dispatches serialized",
               ph ? "decode" : "prefill", (unsigned long long)c->prof_steps[ph], (unsigned long long)c->prof_tokens[ph], tot / 1e6,
               tot / 1e6 / (double)c->prof_steps[ph]);
        for (;;) { /* largest first; entries are cleared as they are printed */
            int bk = -1, bp = -1;
            for (int k = 0; k < VKC_COUNT; k++)
                for (int p = 0; p <= VKP_COUNT; p++)
                    if (c->prof_n[ph][k][p] && (bk < 0 || c->prof_ns[ph][k][p] > c->prof_ns[ph][bk][bp])) bk = k, bp = p;
            if (bk < 0) break;
            char name[48] = "copy";
            if (bp < VKP_ADD) snprintf(name, sizeof name, "%s_%s", k_vk_kind_names[bp / VKT_COUNT], k_vk_type_names[bp % VKT_COUNT]);
            else if (bp < VKP_COUNT) snprintf(name, sizeof name, "%s", k_vk_plain[bp - VKP_ADD].name);
            double ns = c->prof_ns[ph][bk][bp];
            vk_log(c->vk, MOE_LOG_INFO, "vk profile, %s: %5.1f%% %10.3f ms  %-22s %-12s x%u", ph ? "decode" : "prefill", tot > 0 ? 100.0 * ns / tot : 0.0,
                   ns / 1e6, k_vkc_names[bk], name, c->prof_n[ph][bk][bp]);
            c->prof_n[ph][bk][bp] = 0;
        }
    }
}

/* ---- step bracket ---- */
static void vk_begin_step(void *be) {
    vk_ctx *c = be;
    c->n_recs = 0;
    c->have_pos0 = 0;
    c->step_pos0 = 0;
    c->step_n = 0;
    c->step_evals = 0;
    c->fuse_idx = -1;
    c->pn.active = 0;
    c->err = MOE_OK;
    c->seg0 = 0;
    if (vk_tiered(c->vk) && !c->locked) { /* the stage and the slots are the model's: one context's step at a time */
        pthread_mutex_lock(&c->vk->xg->step_mu);
        c->locked = 1;
    }
    /* over a host tier the route log keeps the previous step's choice: the prediction for prefetch */
    if (c->xg_n && !vk_tiered(c->vk)) memset(c->xg_n, 0, (size_t)c->vk->w->hp.n_layer * sizeof *c->xg_n);
    if (c->dead) vk_ctx_fail(c, MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
}

/* waits for the step's (or segment's) submission */
static moe_status vk_step_wait(vk_ctx *c) {
    moe_vk_backend *vk = c->vk;
    VkResult r = vk->f.WaitForFences(vk->dev, 1, &c->fence, 1, 600ull * 1000000000ull);
    if (r == VK_SUCCESS) r = vk->f.ResetFences(vk->dev, 1, &c->fence);
    if (r != VK_SUCCESS) {
        if (r == VK_ERROR_DEVICE_LOST || r == VK_TIMEOUT) c->dead = 1;
        return vk_fail(MOE_ERR_DEVICE, "Vulkan: the step failed on the device (%s)", vk_result_str(r));
    }
    return MOE_OK;
}

/* ---- submissions and their GPU time; max_submit_us ----
   The cost of a record: the bytes its kernel moves plus a flop weight, from vk_cost (the heavy
   kernels: matrix products, attention, experts), plus a constant for a dispatch and its barrier.
   GPU ns per unit is calibrated from each submission's two timestamps (prefill and decode apart),
   rising at once when a submission ran longer than predicted and settling slowly otherwise. */
#define VK_UNIT_FLOP 0.05       /* units per flop (per byte: 1) */
#define VK_UNIT_DISPATCH 65536.0
static double vk_unit(const vk_ctx *c, int i) { return c->rec_cost[i][0] + VK_UNIT_FLOP * c->rec_cost[i][1] + VK_UNIT_DISPATCH; }

/* submits cb on the context's queue, waits for it, and charges its GPU time (units: its estimated
   cost; 0 = not used for the calibration) */
static moe_status vk_run(vk_ctx *c, VkCommandBuffer cb, int ph, double units) {
    moe_vk_backend *vk = c->vk;
    moe_status st = vk_submit_on(vk, c->queue, cb, c->fence, "step");
    if (!st) st = vk_step_wait(c);
    if (st) return st;
    uint64_t t[2];
    if (c->tpool && vk->f.GetQueryPoolResults(vk->dev, c->tpool, 0, 2, sizeof t, t, 8, VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT) == VK_SUCCESS) {
        double ns = (double)((t[1] - t[0]) & vk->ts_mask) * vk->ts_ns;
        c->sub_n++;
        c->sub_total_ns += ns;
        if (ns > c->sub_max_ns) c->sub_max_ns = ns;
        if (units > 0) {
            double k = ns / units, *cal = &c->ns_per_unit[ph];
            *cal = k > *cal ? k : 0.75 * *cal + 0.25 * k;
        }
    }
    return MOE_OK;
}


/* a chunk whose estimate exceeds max_submit_us: consecutive records, as many as fit the cap (at
   least one), each part its own command buffer, submitted and waited for in order (each begins
   with a full barrier, so the results are those of one submission); abort is polled between parts */
static moe_status vk_run_split(vk_ctx *c, int ph) {
    double cap_ns = 1e3 * (double)c->shape.max_submit_us;
    for (int i0 = 0, i1; i0 < c->n_recs; i0 = i1) {
        if (i0 && c->shape.abort && c->shape.abort(c->shape.abort_user))
            return vk_fail(MOE_ERR_CANCELLED, "moe_step: cancelled by the abort callback");
        double u = vk_unit(c, i0);
        for (i1 = i0 + 1; i1 < c->n_recs && (u + vk_unit(c, i1)) * c->ns_per_unit[ph] <= cap_ns; i1++) u += vk_unit(c, i1);
        moe_status st = vk_record_cb(c, c->split_cb, c->recs + i0, i1 - i0);
        if (!st) st = vk_run(c, c->split_cb, ph, u);
        if (st) return st;
    }
    return MOE_OK;
}

static moe_status vk_submit_times(void *be, uint64_t *n, double *max_us, double *total_us, int reset) {
    vk_ctx *c = be;
    if (!c->tpool) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: this queue has no timestamps: no submission times");
    if (n) *n = c->sub_n;
    if (max_us) *max_us = c->sub_max_ns / 1e3;
    if (total_us) *total_us = c->sub_total_ns / 1e3;
    if (reset) c->sub_n = 0, c->sub_max_ns = c->sub_total_ns = 0;
    return MOE_OK;
}

/* over a host tier: records the step's records not submitted yet (after the pending copies),
   submits them and waits */
static moe_status vk_seg_run(vk_ctx *c, int end) {
    uint32_t *sp = (uint32_t *)c->step.map; /* the first segment already needs the position (attention ran before the route op) */
    sp[0] = (uint32_t)c->step_pos0;
    sp[1] = (uint32_t)c->step_n;
    moe_status st = vk_record_cb(c, c->seg_cb, c->recs + c->seg0, c->n_recs - c->seg0);
    if (!st) st = vk_run(c, c->seg_cb, c->step_n > 1 ? 0 : 1, 0);
    if (!st) vk_prof_collect(c, c->seg0, c->n_recs - c->seg0, end);
    c->seg0 = c->n_recs;
    c->fuse_idx = -1; /* a submitted record takes no residual add any more */
    return st;
}

static moe_status vk_end_step_run(vk_ctx *c);
static moe_status vk_end_step(void *be) {
    vk_ctx *c = be;
    moe_status st = vk_end_step_run(c);
    if (c->locked) {
        c->locked = 0;
        pthread_mutex_unlock(&c->vk->xg->step_mu);
    }
    return st;
}

static moe_status vk_end_step_run(vk_ctx *c) {
    moe_vk_backend *vk = c->vk;
    vk_pn_flush(c);
    if (c->err && c->n_xf) { /* slot copies the host's view already counts on: they still go to the queue */
        c->seg0 = c->n_recs;
        moe_status st = vk_seg_run(c, 0);
        if (st) c->dead = 1;
    }
    if (c->err) {
        moe_internal_set_error(c->err, "%s", c->errmsg);
        moe_status st = c->err;
        c->err = MOE_OK;
        return st;
    }
    uint32_t *sp = (uint32_t *)c->step.map;
    sp[0] = (uint32_t)c->step_pos0;
    sp[1] = (uint32_t)c->step_n;
    if (vk_tiered(vk)) { /* the step's last segment (the step buffer was written before the first one) */
        moe_status st = vk_seg_run(c, 1);
        if (!st) c->expert_evals += c->step_evals;
        return st;
    }
    int ph = c->step_n > 1 ? 0 : 1;
    double units = 0;
    for (int i = 0; i < c->n_recs; i++) units += vk_unit(c, i);
    if (c->shape.max_submit_us && c->tpool && c->split_cb && c->n_recs > 1 && units * c->ns_per_unit[ph] > 1e3 * (double)c->shape.max_submit_us) {
        moe_status st = vk_run_split(c, ph); /* (per-dispatch profiling skips split chunks) */
        if (st) return st;
        c->expert_evals += c->step_evals;
        return c->vk->xg ? vk_xg_after_step(c) : MOE_OK;
    }
    size_t bytes = (size_t)c->n_recs * sizeof(vk_rec);
    uint64_t frees = vk->ctx_frees;
    if (c->bseg && frees != c->frees_seen) { /* a lead's command buffers may bind a freed context's caches: never replay them */
        for (int i = 0; i < VK_CACHE; i++) c->cache[i].n = -1;
        c->frees_seen = frees;
    }
    vk_cached *hit = NULL, *victim = &c->cache[0];
    for (int i = 0; i < VK_CACHE; i++) {
        vk_cached *e = &c->cache[i];
        if (e->n == c->n_recs && e->recs && !memcmp(e->recs, c->recs, bytes)) hit = e;
        if (e->used < victim->used) victim = e;
    }
    if (!hit) {
        hit = victim;
        hit->n = -1;
        moe_status st = vk_record_cb(c, hit->cb, c->recs, c->n_recs);
        if (st) return st;
        vk_rec *copy = realloc(hit->recs, bytes ? bytes : 1);
        if (copy) { /* without the copy the command buffer still runs, it is just not found again */
            memcpy(copy, c->recs, bytes);
            hit->recs = copy;
            hit->n = c->n_recs;
        }
    }
    hit->used = ++c->tick;
    moe_status st = vk_run(c, hit->cb, ph, units);
    if (st) return st;
    vk_prof_collect(c, 0, c->n_recs, 1);
    c->expert_evals += c->step_evals;
    if (c->vk->xg) return vk_xg_after_step(c); /* the GPU expert slot cache: hits, misses, slot fills for the next steps */
    return MOE_OK;
}

static int vk_logits_rows(const void *be) { return ((const vk_ctx *)be)->logits_cap; }

static void vk_logits_out(void *be, int row0, int n) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_flush(c);
    vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
    if (!r) return;
    VkDeviceSize rb = (VkDeviceSize)c->w->hp.n_vocab * 4;
    vk_bind_range(r, 0, c->act[ACT_LOGITS].buf, 0, (VkDeviceSize)n * rb, 0);
    vk_bind_range(r, 1, c->logits.buf, (VkDeviceSize)row0 * rb, 0, 1);
    c->fuse_idx = -1;
}

static void vk_read_logits(void *be, float *dst, int n) {
    vk_ctx *c = be;
    memcpy(dst, c->logits.map, (size_t)n * (size_t)c->w->hp.n_vocab * sizeof(float));
}

/* copies, per cache, the K then V rows of the positions it holds among [0, n_pos) between host
   and device, in position order (the CPU backend's layout) */
static moe_status vk_kv_copy(vk_ctx *c, uint8_t *host, int n_pos, int download) {
    const moe_weights *w = c->w;
    if (c->dead) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
    if (n_pos <= 0) return MOE_OK;
    vk_xfer x;
    moe_status st = vk_xfer_begin(c->vk, &x, (VkDeviceSize)8 << 20, download);
    if (st) return st;
    for (int i = 0; i < w->hp.n_cache; i++) {
        VkDeviceSize rb = (VkDeviceSize)w->caches[i].kv_width * (c->kv_f16 ? 2 : 4);
        int rows = c->kv_rows[i], p0 = n_pos > rows ? n_pos - rows : 0;
        for (int kv = 0; kv < 2; kv++)
            for (int p = p0; p < n_pos;) { /* runs of positions that are contiguous in the ring */
                int run = rows - p % rows < n_pos - p ? rows - p % rows : n_pos - p;
                VkDeviceSize bytes = (VkDeviceSize)run * rb;
                vk_xfer_copy(&x, host, bytes, kv ? c->vc.buf : c->kc.buf, c->kv_off[i] + (VkDeviceSize)(p % rows) * rb);
                host += bytes;
                p += run;
            }
    }
    return vk_xfer_end(&x);
}
static moe_status vk_kv_save(void *be, void *dst, int n_pos) { return vk_kv_copy(be, dst, n_pos, 1); }
static moe_status vk_kv_load(void *be, const void *src, int n_pos) { return vk_kv_copy(be, (uint8_t *)(uintptr_t)src, n_pos, 0); }

void moe_vk_ctx_free(void *be) {
    vk_ctx *c = be;
    if (!c) return;
    moe_vk_backend *vk = c->vk;
    vk->ctx_frees++; /* (an atomic increment: _Atomic) */
    if (c->profile && c->prof_env) vk_prof_report(c);
    if (vk->xc && c->xg_ids) { /* the host tier's side of this context, as the CPU backend logs it */
        const moe_xs_counts *x = &c->xcnt;
        vk_log(vk, MOE_LOG_INFO, "expert streaming (this context): GPU slots: hits %llu, misses %llu (pairs), %.1f MiB to the device; "
               "host tier (for the GPU misses): hits %llu, misses %llu (pairs), %.1f MiB read; %llu units prefetched, %llu of them used",
               (unsigned long long)c->xg_hits, (unsigned long long)c->xg_misses, (double)c->xg_bytes / 1048576.0, (unsigned long long)x->hits,
               (unsigned long long)x->misses, (double)x->bytes / 1048576.0, (unsigned long long)x->pf_issued, (unsigned long long)x->pf_used);
    }
    free(c->rec_cost);
    if (c->fence) vk->f.DestroyFence(vk->dev, c->fence, NULL);
    if (c->qpool) vk->f.DestroyQueryPool(vk->dev, c->qpool, NULL);
    if (c->tpool) vk->f.DestroyQueryPool(vk->dev, c->tpool, NULL);
    if (c->pool) vk->f.DestroyCommandPool(vk->dev, c->pool, NULL); /* frees the command buffers */
    for (int i = 0; i < ACT_COUNT; i++) vk_buf_free(vk, &c->act[i]);
    vk_buf *bufs[] = {&c->h, &c->p, &c->aux, &c->split, &c->kc, &c->vc, &c->step, &c->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) vk_buf_free(vk, bufs[i]);
    for (int i = 0; i < c->n_rope; i++) vk_buf_free(vk, &c->rope[i].tab);
    vk_buf_free(vk, &c->rlog);
    vk_buf_free(vk, &c->st);
    vk_buf_free(vk, &c->ck);
    vk_buf_free(vk, &c->dn_scr);
    free(c->st_conv);
    free(c->st_rec);
    free(c->xg_n);
    free(c->xf);
    free(c->xg_ids);
    free(c->xg_pred);
    free(c->xg_pairs);
    free(c->xg_dst);
    free(c->kv_off);
    free(c->kv_size);
    free(c->kv_rows);
    for (int i = 0; i < VK_CACHE; i++) free(c->cache[i].recs);
    free(c->recs);
    free(c);
}

/* bytes at the end of a context's split buffer for attn.comp -DSPLIT's arrival counters: one per
   workgroup of a split decode token's grid (n_head / gw <= n_head), for the most heads a layer has */
static VkDeviceSize vk_split_counters(const moe_weights *w) {
    VkDeviceSize heads = 1;
    for (int l = 0; l < w->hp.n_layer; l++)
        if ((VkDeviceSize)w->layers[l].p.attn.n_head > heads) heads = (VkDeviceSize)w->layers[l].p.attn.n_head;
    return vk_align_up(heads * 4, VK_ALIGN);
}

static moe_status vk_act_new(vk_ctx *c, vk_buf *b, VkDeviceSize bytes, const char *what) {
    if (bytes > c->vk->props.limits.maxStorageBufferRange)
        return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: the %s buffer needs %.1f MiB, more than one storage binding (%u MiB) holds: use a smaller n_batch",
                       what, (double)bytes / 1048576.0, c->vk->props.limits.maxStorageBufferRange >> 20);
    return vk_buf_new(c->vk, b, bytes, VK_MEM_DEVICE, what);
}

moe_status moe_vk_ctx_new(moe_vk_backend *vk, const moe_ctx_shape *shape, void **be_out) {
    if (!be_out) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_ctx_new: be_out is NULL");
    *be_out = NULL;
    if (!vk || !shape || shape->n_ctx <= 0 || shape->n_batch <= 0) return vk_fail(MOE_ERR_INVALID_ARG, "moe_vk_ctx_new: bad arguments");
    const moe_hparams *hp = &vk->w->hp;
    if (shape->n_batch > 65535) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: n_batch %d is above 65535", shape->n_batch);
    vk_ctx *c = calloc(1, sizeof *c);
    if (!c) return vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    c->vk = vk;
    c->w = vk->w;
    c->shape = *shape;
    c->kv_f16 = shape->kv_type == MOE_KV_F16;
    c->serial = vk_env_on("MOE_VK_SERIAL"); /* debugging: a barrier between every two dispatches */
    moe_status st = MOE_OK;
    const VkDeviceSize nb = (VkDeviceSize)shape->n_batch, k = (VkDeviceSize)hp->n_expert_used;
    const VkDeviceSize q_w = (VkDeviceSize)hp->n_head * (VkDeviceSize)hp->head_dim, kv_w = (VkDeviceSize)hp->n_head_kv * (VkDeviceSize)hp->head_dim,
                       ple_w = (VkDeviceSize)hp->n_layer * (VkDeviceSize)hp->n_ple, E_w = (VkDeviceSize)hp->n_embd;
    const VkDeviceSize widths[ACT_COUNT] = {E_w, E_w, q_w, kv_w, kv_w, q_w, E_w, (VkDeviceSize)hp->n_expert, (VkDeviceSize)hp->n_vocab,
                                            E_w, (VkDeviceSize)hp->n_ff, (VkDeviceSize)hp->n_ff, ple_w, ple_w,
                                            /* hybrid models (Gated DeltaNet) */
                                            (VkDeviceSize)hp->dn_qkv, (VkDeviceSize)hp->dn_conv, (VkDeviceSize)hp->dn_value,
                                            2 * (VkDeviceSize)hp->dn_v_head, (VkDeviceSize)hp->dn_v_head, (VkDeviceSize)hp->dn_value};
    static const char *const act_names[ACT_COUNT] = {"x", "xn", "q", "k", "v", "attn", "out", "router", "logits", "out2", "ff", "ff2", "ple", "ple2",
                                                     "dn qkv", "dn conv", "dn z", "dn beta", "dn alpha", "dn o"};
    /* logits: ACT_LOGITS holds as many rows as one storage binding does (the forward computes
       them in chunks of that many); the host-visible readback, a copy target only, holds all.
       A step gives at most n_batch rows, fewer where the shape says so (moe_step_batch's lead:
       only the rows its passes expose, not one per token of the pass) */
    VkDeviceSize logit_rows = !shape->logits_all ? 1 : shape->logit_rows > 0 && (VkDeviceSize)shape->logit_rows < nb ? (VkDeviceSize)shape->logit_rows : nb;
    VkDeviceSize row_bytes = (VkDeviceSize)hp->n_vocab * 4;
    VkDeviceSize cap_rows = vk->props.limits.maxStorageBufferRange / row_bytes;
    c->logits_cap = (int)(logit_rows < cap_rows ? logit_rows : cap_rows);
    if (c->logits_cap < 1) st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: one row of logits exceeds a storage binding");
    for (int i = 0; i < ACT_COUNT && !st; i++) /* roles the model does not use get a token buffer */
        st = vk_act_new(c, &c->act[i], widths[i] ? (i == ACT_LOGITS ? (VkDeviceSize)c->logits_cap : nb) * widths[i] * 4 : VK_ALIGN, act_names[i]);
    if (!st) st = vk_act_new(c, &c->h, nb * k * (VkDeviceSize)hp->n_ff_exp * 4, "expert hidden");
    if (!st) st = vk_act_new(c, &c->p, (nb > VK_MV_MAX ? nb * k : 1) * (VkDeviceSize)hp->n_embd * 4, "expert output");
    c->max_items = (uint32_t)((nb * k + 63) / 64 + (VkDeviceSize)hp->n_expert);
    c->ids_off = 0;
    c->w_off = (uint32_t)(nb * k);
    c->list_off = (uint32_t)(2 * nb * k);
    c->pos_off = (uint32_t)(3 * nb * k);
    c->items_off = (uint32_t)(4 * nb * k);
    c->cnt_off = c->items_off + 4 + 4 * c->max_items;
    if (!st && hp->n_state && !shape->batch_lead) { /* recurrent states and their checkpoints */
        const moe_weights *w = vk->w;
        c->st_conv = calloc((size_t)hp->n_state, sizeof *c->st_conv);
        c->st_rec = calloc((size_t)hp->n_state, sizeof *c->st_rec);
        if (!c->st_conv || !c->st_rec) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        for (int i = 0; !st && i < hp->n_state; i++) {
            c->st_conv[i] = c->st_bytes;
            c->st_bytes += ((VkDeviceSize)w->states[i].conv_elems * 4 + VK_ALIGN - 1) / VK_ALIGN * VK_ALIGN;
            c->st_rec[i] = c->st_bytes;
            c->st_bytes += ((VkDeviceSize)w->states[i].rec_elems * 4 + VK_ALIGN - 1) / VK_ALIGN * VK_ALIGN;
        }
        c->n_ckpt = moe_ckpt_slots(shape->n_ctx) + (shape->state_backup ? 1 : 0); /* the last: the step's backup */
        if (!st) st = vk_buf_new(vk, &c->st, c->st_bytes, VK_MEM_DEVICE, "recurrent states");
        if (!st) st = vk_buf_new(vk, &c->ck, c->n_ckpt ? (VkDeviceSize)c->n_ckpt * c->st_bytes : VK_ALIGN, VK_MEM_DEVICE, "state checkpoints");
        /* MOE_VK_DN_CHUNK=N: the chunked delta rule from N tokens on (0: token by token always) */
        const char *e = getenv("MOE_VK_DN_CHUNK");
        c->dn_chunk_min = e && *e ? atoi(e) : VK_DN_CHUNK_MIN;
        if (c->dn_chunk_min < 0) c->dn_chunk_min = 0;
        VkDeviceSize per_tok = 0; /* floats per (padded) token of the widest Gated DeltaNet layer */
        for (int l = 0; l < hp->n_layer; l++) {
            const moe_layer_plan *lp = &w->layers[l].p;
            if (lp->attn_kind != MOE_ATTN_DELTANET) continue;
            VkDeviceSize f = (VkDeviceSize)lp->dn.n_v_head * (4 + (VkDeviceSize)lp->dn.k_dim + (VkDeviceSize)lp->dn.v_dim + VK_DN_CT);
            if (f > per_tok) per_tok = f;
        }
        VkDeviceSize scr_bytes = (nb + VK_DN_CT - 1) / VK_DN_CT * VK_DN_CT * per_tok * 4;
        /* a scratch beyond one storage binding (a huge n_batch): token by token, not a failure */
        if (c->dn_chunk_min && c->dn_chunk_min <= shape->n_batch && per_tok && !st && scr_bytes <= vk->props.limits.maxStorageBufferRange)
            st = vk_act_new(c, &c->dn_scr, scr_bytes, "chunked delta rule");
        if (!c->dn_scr.buf) c->dn_chunk_min = 0;
    }
    if (!st) st = vk_act_new(c, &c->aux, ((VkDeviceSize)c->cnt_off + VK_MV_MAX) * 4, "routing");
    if (!st) { /* route_mv.comp's counters start at zero (each dispatch leaves them so) */
        uint32_t zeros[VK_MV_MAX] = {0};
        st = vk_upload(vk, zeros, sizeof zeros, c->aux.buf, c->aux.off + (VkDeviceSize)c->cnt_off * 4);
    }
    if (!st) { /* split-KV partials, for the widest attention layer, and the arrival counters (zeros, as
                  attn.comp leaves them); only contexts that can exceed VK_SPLIT_MIN keys */
        VkDeviceSize split_w = 0;
        for (int l = 0; l < hp->n_layer; l++) {
            const moe_layer_plan *lp = &c->w->layers[l].p;
            VkDeviceSize wl = (VkDeviceSize)lp->attn.n_head * (VkDeviceSize)(lp->attn.head_dim + 2);
            if ((lp->attn_kind == MOE_ATTN_FULL || lp->attn_kind == MOE_ATTN_SLIDING) && wl > split_w) split_w = wl;
        }
        int split = shape->n_ctx > VK_SPLIT_MIN && split_w;
        VkDeviceSize cnt = vk_split_counters(c->w);
        st = vk_act_new(c, &c->split, split ? vk_align_up(split_w * VK_SPLIT_MAX * 4, VK_ALIGN) + cnt : VK_ALIGN, "split attention");
        if (!st && split) {
            uint8_t *zero = calloc(1, (size_t)cnt);
            st = zero ? vk_upload(vk, zero, cnt, c->split.buf, c->split.off + c->split.size - cnt) : vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
            free(zero);
        }
    }
    /* KV caches, each at an aligned offset of one K and one V buffer */
    size_t n_cache = (size_t)(hp->n_cache ? hp->n_cache : 1);
    c->kv_off = calloc(n_cache, sizeof *c->kv_off);
    c->kv_size = calloc(n_cache, sizeof *c->kv_size);
    c->kv_rows = calloc(n_cache, sizeof *c->kv_rows);
    if (!st && (!c->kv_off || !c->kv_size || !c->kv_rows)) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
    VkDeviceSize kv_total = 0;
    for (int i = 0; !st && i < hp->n_cache; i++) {
        c->kv_rows[i] = moe_cache_rows(&c->w->caches[i], shape->n_ctx, shape->n_batch);
        c->kv_size[i] = vk_align_up((VkDeviceSize)c->kv_rows[i] * (VkDeviceSize)c->w->caches[i].kv_width * (c->kv_f16 ? 2 : 4), VK_ALIGN);
        c->kv_off[i] = kv_total;
        kv_total += c->kv_size[i];
        if (c->kv_size[i] > vk->props.limits.maxStorageBufferRange)
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: one layer of KV cache (n_ctx %d) exceeds a storage binding", shape->n_ctx);
    }
    if (!st) st = vk_buf_new(vk, &c->kc, kv_total ? kv_total : VK_ALIGN, VK_MEM_DEVICE, "the K cache");
    if (!st) st = vk_buf_new(vk, &c->vc, kv_total ? kv_total : VK_ALIGN, VK_MEM_DEVICE, "the V cache");
    /* RoPE tables exactly as the CPU backend computes the angles: inv_freq in f32, angle =
       f32(pos · inv_freq); one per distinct rope among the layers */
    for (int l = 0; !st && l < hp->n_layer; l++) {
        const moe_layer_plan *lp = &c->w->layers[l].p;
        if (lp->attn_kind != MOE_ATTN_FULL && lp->attn_kind != MOE_ATTN_SLIDING) continue;
        int have = 0;
        for (int i = 0; i < c->n_rope && !have; i++) have = !memcmp(&c->rope[i].r, &lp->rope, sizeof lp->rope);
        if (have) continue;
        if (c->n_rope == VK_MAX_ROPES) {
            st = vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: more than %d rope settings among the layers", VK_MAX_ROPES);
            break;
        }
        const moe_rope *rp = &lp->rope;
        int half = rp->n_rot / 2;
        VkDeviceSize rope_bytes = (VkDeviceSize)shape->n_ctx * (VkDeviceSize)(half ? half : 1) * 8;
        c->rope[c->n_rope].r = *rp;
        if ((st = vk_act_new(c, &c->rope[c->n_rope].tab, rope_bytes, "rope table"))) break;
        vk_buf *tb = &c->rope[c->n_rope++].tab;
        float *tab = malloc(rope_bytes);
        if (!tab) {
            st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
            break;
        }
        for (int p = 0; p < half; p++) {
            float inv_freq = (float)(1.0 / pow((double)rp->base, (double)(2 * p) / (double)rp->freq_dim));
            for (int pos = 0; pos < shape->n_ctx; pos++) {
                float ang = (float)pos * inv_freq;
                size_t at = 2 * ((size_t)pos * (size_t)half + (size_t)p);
                tab[at] = p < rp->n_freq ? cosf(ang) : 1.0f;
                tab[at + 1] = p < rp->n_freq ? sinf(ang) : 0.0f;
            }
        }
        st = vk_upload(vk, tab, rope_bytes, tb->buf, 0);
        free(tab);
    }
    /* segment headers: a pass of moe_step_batch binds one per segment at an aligned offset */
    c->seg_stride = vk_align_up(16, vk->props.limits.minStorageBufferOffsetAlignment ? vk->props.limits.minStorageBufferOffsetAlignment : 16);
    c->seg_base = vk_align_up((4 + nb) * 4, c->seg_stride);
    if (!st) st = vk_buf_new(vk, &c->step, c->seg_base + nb * c->seg_stride, VK_MEM_HOST, "the step buffer");
    if (!st) st = vk_buf_new(vk, &c->logits, logit_rows * (VkDeviceSize)hp->n_vocab * 4, VK_MEM_HOST_READ, "the logits readback");
    if (!st) {
        memset(c->step.map, 0, (size_t)c->step.size);
        VkCommandPoolCreateInfo pci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, vk->qfam};
        VkResult r = vk->f.CreateCommandPool(vk->dev, &pci, NULL, &c->pool);
        VkCommandBuffer cbs[VK_CACHE];
        VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, c->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, VK_CACHE};
        if (r == VK_SUCCESS) r = vk->f.AllocateCommandBuffers(vk->dev, &cai, cbs);
        for (int i = 0; i < VK_CACHE && r == VK_SUCCESS; i++) c->cache[i].cb = cbs[i];
        VkFenceCreateInfo fci = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO, NULL, 0};
        if (r == VK_SUCCESS) r = vk->f.CreateFence(vk->dev, &fci, NULL, &c->fence);
        cai.commandBufferCount = 1;
        if (r == VK_SUCCESS) r = vk->f.AllocateCommandBuffers(vk->dev, &cai, &c->split_cb);
        if (r == VK_SUCCESS && vk->timestamps) {
            VkQueryPoolCreateInfo qci = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO, NULL, 0, VK_QUERY_TYPE_TIMESTAMP, 2, 0};
            r = vk->f.CreateQueryPool(vk->dev, &qci, NULL, &c->tpool);
        }
        c->queue = shape->low_priority && vk->queue_low ? vk->queue_low : vk->queue;
        c->ns_per_unit[0] = c->ns_per_unit[1] = 0.01; /* 100 GB/s until the first submission is timed */
        if (r == VK_SUCCESS && vk_env_on("MOE_VK_PROFILE")) {
            if (!vk->timestamps) vk_log(vk, MOE_LOG_WARN, "MOE_VK_PROFILE: this queue has no timestamps");
            else {
                VkQueryPoolCreateInfo qci = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO, NULL, 0, VK_QUERY_TYPE_TIMESTAMP, 8192, 0};
                r = vk->f.CreateQueryPool(vk->dev, &qci, NULL, &c->qpool);
                c->q_cap = 8192;
                c->profile = c->prof_env = 1;
            }
        }
        if (r != VK_SUCCESS) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: creating the context's command pool failed (%s)", vk_result_str(r));
    }
    if (!st && vk->xg) { /* GPU expert slot cache: the route log */
        c->xg_stride = (uint32_t)(nb * k);
        if (!(c->xg_n = calloc((size_t)hp->n_layer, sizeof *c->xg_n))) st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        if (!st) st = vk_buf_new(vk, &c->rlog, (VkDeviceSize)hp->n_layer * nb * k * 4, VK_MEM_HOST_READ, "the route log");
        size_t E = (size_t)vk->xg->E;
        if (!st && vk->xc && (!(c->xf = calloc(E * VK_XG_T + VK_XG_T, sizeof *c->xf)) || !(c->xg_ids = calloc(E, sizeof *c->xg_ids)) ||
                              !(c->xg_pred = calloc((size_t)hp->n_layer * E, 1)) ||
                              !(c->xg_pairs = calloc(E, sizeof *c->xg_pairs)) || !(c->xg_dst = calloc(E * MOE_XS_MAX_T, sizeof *c->xg_dst))))
            st = vk_fail(MOE_ERR_NO_MEMORY, "Vulkan: out of host memory");
        if (!st && vk->xc) { /* the segments' command buffer */
            VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, c->pool, VK_COMMAND_BUFFER_LEVEL_PRIMARY, 1};
            VkResult r = vk->f.AllocateCommandBuffers(vk->dev, &cai, &c->seg_cb);
            if (r != VK_SUCCESS) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: vkAllocateCommandBuffers failed (%s)", vk_result_str(r));
        }
    }
    if (st) {
        moe_vk_ctx_free(c);
        return st;
    }
    *be_out = c;
    return MOE_OK;
}

/* ============================================================================================ */
/* 7. ops                                                                                        */
/* ============================================================================================ */
static uint32_t vk_f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static uint32_t vk_div_up(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

/* a record's push constants as the contract's struct of its kernel (copies: no aliasing) */
#define VK_PC_SET(r, kernel, ...)                                                            \
    do {                                                                                     \
        vk_pc_##kernel pc_ = __VA_ARGS__;                                                    \
        _Static_assert(sizeof pc_ <= sizeof(r)->pc, "push constants of " #kernel " too big"); \
        memcpy((r)->pc, &pc_, sizeof pc_);                                                   \
    } while (0)
#define VK_PC_GET(r, kernel, out) memcpy(&(out), (r)->pc, sizeof(vk_pc_##kernel))

/* the device placement of a weight, or a failure */
static const vk_wt *vk_wt_of(vk_ctx *c, const moe_weight *w) {
    if (!w || !w->dev) {
        vk_ctx_fail(c, MOE_ERR_INVALID_ARG, "Vulkan: weight '%s' is not on the device", w && w->name ? w->name : "?");
        return NULL;
    }
    return w->dev;
}

static void vk_bind_part(vk_rec *r, const vk_part *p) {
    r->wmode = 1;
    r->win = p->win;
    r->woff = p->off;
    r->wrange = p->bytes + VK_PAD;
}

/* a record that writes all n rows of role with a kernel that can add instead (acc word) */
static void vk_mark_fusable(vk_ctx *c, int role, int n, int acc_word) {
    c->fuse_idx = c->n_recs - 1;
    c->fuse_role = role;
    c->fuse_rows = n;
    c->fuse_acc = acc_word;
}

static int32_t vk_pos_delta(vk_ctx *c, int pos0) {
    if (!c->have_pos0) {
        c->have_pos0 = 1;
        c->step_pos0 = pos0;
    }
    return pos0 - c->step_pos0;
}

static void vk_op_embed(void *be, int dst, const moe_weight *w, const moe_token *tokens, int n) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (!wt || c->err) return;
    if (n > c->shape.n_batch) {
        vk_ctx_fail(c, MOE_ERR_INVALID_ARG, "Vulkan: %d tokens in a step of at most %d", n, c->shape.n_batch);
        return;
    }
    vk_pn_touch(c, 0, 1u << dst);
    uint32_t *sp = (uint32_t *)c->step.map;
    for (int i = 0; i < n; i++) sp[4 + i] = (uint32_t)tokens[i];
    c->step_n = n;
    int t = vk_type_index(w->type);
    uint32_t K = (uint32_t)w->ne[0];
    for (uint32_t j = 0; j < wt->n_parts; j++) {
        const vk_part *p = &c->vk->parts[wt->part0 + j];
        vk_rec *r = vk_rec_new(c, VKP_TYPED(VKK_EMBED, t), VKC_EMBED);
        if (!r) return;
        vk_bind(r, 1, &c->act[dst], 1);
        vk_bind_part(r, p);
        VK_PC_SET(r, EMBED, {K, (uint32_t)w->row_bytes, (uint32_t)p->row_lo, (uint32_t)p->row_hi});
        r->grid[0] = vk_div_up(K, 16u * k_vk_kind_wg[VKK_EMBED]);
        r->grid[1] = (uint32_t)n;
        r->grid[2] = 1;
    }
    c->fuse_idx = -1;
}

static void vk_emit_rmsnorm(vk_ctx *c, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    const vk_wt *wt = w ? vk_wt_of(c, w) : NULL;
    if (c->err || n_rows <= 0) return;
    vk_rec *r = vk_rec_new(c, VKP_RMSNORM, VKC_NORM);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    if (wt) {
        const vk_part *p = &c->vk->parts[wt->part0];
        vk_bind_range(r, 2, c->vk->win[p->win].buf, p->off, p->bytes, 0);
    }
    VK_PC_SET(r, RMSNORM, {(uint32_t)width, wt != NULL, (uint32_t)n_rows, eps});
    vk_grid_fold(r, (uint64_t)n_rows, 1);
    c->fuse_idx = -1;
}

/* the pending norm becomes a dispatch (unless a consumer already wrote its output) and ends */
static void vk_pn_flush(vk_ctx *c) {
    if (c->pn.active && !c->pn.done) {
        c->pn.active = 0;
        vk_emit_rmsnorm(c, c->pn.dst, c->pn.src, c->pn.w, c->pn.rows, c->pn.width, c->pn.eps);
    }
    c->pn.active = 0;
}

/* before an op that reads the roles in mask rd and writes those in wr */
static void vk_pn_touch(vk_ctx *c, unsigned rd, unsigned wr) {
    if (!c->pn.active) return;
    unsigned d = 1u << c->pn.dst, s = 1u << c->pn.src;
    if (((rd & d) && !c->pn.done) || (wr & (d | s))) vk_pn_flush(c);
}

/* binds the pending norm into a matrix-vector record: x from src, the norm weight at slot g, the
   normalised output at slot xn; eps and norm are the words of the kernel's pc fields of those names
   (mv.comp: slots 4 and 5; route_mv.comp: 3 and 1) */
static void vk_pn_inline(vk_ctx *c, vk_rec *r, int g, int xn, int eps, int norm) {
    const vk_wt *wt = c->pn.w->dev;
    const vk_part *p = &c->vk->parts[wt->part0];
    vk_bind(r, 0, &c->act[c->pn.src], 0);
    vk_bind_range(r, g, c->vk->win[p->win].buf, p->off, p->bytes, 0);
    r->pc[eps] = vk_f2u(c->pn.eps);
    r->pc[norm] = 1;
    if (!c->pn.done) {
        vk_bind(r, xn, &c->act[c->pn.dst], 1);
        r->pc[norm] |= 2;
        c->pn.done = 1;
    }
}

static void vk_op_rmsnorm(void *be, int dst, int src, const moe_weight *w, int n_rows, int width, float eps) {
    vk_ctx *c = be;
    if (c->err || n_rows <= 0) return;
    vk_pn_touch(c, 1u << src, 1u << dst);
    const vk_wt *wt = w ? vk_wt_of(c, w) : NULL;
    if (wt && n_rows <= VK_MV_MAX && dst != src && width % 16 == 0 && wt->n_parts == 1) {
        c->pn.active = 1;
        c->pn.done = 0;
        c->pn.dst = dst;
        c->pn.src = src;
        c->pn.rows = n_rows;
        c->pn.width = width;
        c->pn.w = w;
        c->pn.eps = eps;
        c->fuse_idx = -1;
        return;
    }
    vk_emit_rmsnorm(c, dst, src, w, n_rows, width, eps);
}

static void vk_op_matmul(void *be, int dst, const moe_weight *w, int src, int src_row0, int n) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (!wt || c->err || n <= 0) return;
    int t = vk_type_index(w->type);
    uint32_t K = (uint32_t)w->ne[0], M = (uint32_t)w->ne[1];
    int mv = n <= VK_MV_MAX;
    int inl = mv && c->pn.active && src == c->pn.dst && src_row0 + n <= c->pn.rows && (int)K == c->pn.width && wt->n_parts == 1;
    if (!inl) vk_pn_touch(c, 1u << src, 1u << dst);
    int kind = dst == ACT_LOGITS ? VKC_LMHEAD : mv ? VKC_MV : VKC_MM;
    for (uint32_t j = 0; j < wt->n_parts; j++) {
        const vk_part *p = &c->vk->parts[wt->part0 + j];
        uint32_t Mp = (uint32_t)(p->row_hi - p->row_lo);
        /* f16 tensor cores round both operands to 11 bits: never for f32 weights (the router,
           whose top-k choice must not flip) */
        int cm = c->vk->coopmat && w->type != MOE_TYPE_F32 && dst != ACT_ROUTER;
        int pipe = VKP_TYPED(mv ? VKK_MV : cm ? VKK_MMCM : VKK_MM, t);
        vk_rec *r = vk_rec_new_spec(c, pipe, kind == VKC_MV ? VK_MV_WG_DENSE : 0, kind);
        if (!r) return;
        vk_bind(r, 0, &c->act[src], 0);
        vk_bind(r, 1, &c->act[dst], 1);
        vk_bind_part(r, p);
        uint32_t nblk = vk_div_up(Mp, mv ? VK_MV_ROWS : 64);
        if (mv) VK_PC_SET(r, MV, {.K = K, .M = Mp, .row_bytes = (uint32_t)w->row_bytes, .nblk = nblk, .x_off = (uint32_t)src_row0 * K,
                                  .x_stride = K, .y_off = (uint32_t)p->row_lo, .y_stride = M});
        else VK_PC_SET(r, MM, {.K = K, .M = Mp, .row_bytes = (uint32_t)w->row_bytes, .nblk = nblk, .x_off = (uint32_t)src_row0 * K,
                               .x_stride = K, .y_off = (uint32_t)p->row_lo, .y_stride = M, .ncols = (uint32_t)n});
        if (inl) vk_pn_inline(c, r, 4, 5, VK_PC_WORD(MV, eps), VK_PC_WORD(MV, norm));
        vk_grid_fold(r, nblk, mv ? (uint32_t)n : vk_div_up((uint64_t)n, 64));
        vk_cost(c, (double)Mp * (double)w->row_bytes + 4.0 * n * ((double)K + Mp), 2.0 * n * (double)K * Mp);
    }
    if (inl) vk_pn_touch(c, 0, 1u << dst);
    c->fuse_idx = -1;
    if (wt->n_parts == 1) vk_mark_fusable(c, dst, n, VK_PC_WORD(MM, acc));
}

static void vk_op_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    const vk_buf *tab = NULL;
    for (int i = 0; i < c->n_rope && !tab; i++)
        if (!memcmp(&c->rope[i].r, rope, sizeof *rope)) tab = &c->rope[i].tab;
    if (!tab) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: rope with %d dims / base %g is none of the model's tables", rope->n_rot, (double)rope->base);
        return;
    }
    vk_pn_touch(c, 1u << buf, 1u << buf);
    int32_t pd = vk_pos_delta(c, pos0);
    VkBuffer b = c->act[buf].buf;
    int hw = c->kv_f16 ? VKP_HEADWISE_F16 : VKP_HEADWISE_F32;
    /* fuse with a per-head RMSNorm of the same buffer recorded just before (q_norm / k_norm) */
    vk_rec *r = NULL;
    for (int i = c->n_recs - 1; i >= 0 && i >= c->n_recs - 3; i--) {
        vk_rec *q = &c->recs[i];
        vk_pc_RMSNORM qn;
        VK_PC_GET(q, RMSNORM, qn);
        if (q->pipe == VKP_RMSNORM && q->slot == c->cur_slot && q->buf[0] == b && q->buf[1] == b && qn.width == (uint32_t)head_dim && qn.has_g &&
            qn.rows == (uint32_t)(n * n_head)) {
            r = q;
            break;
        }
        int touches = 0;
        for (int s = 0; s < VK_NB; s++) touches |= q->buf[s] == b;
        if (touches || q->pipe >= VK_REC_FILL) break;
    }
    uint32_t flags = 2; /* rope */
    float eps = 0;
    if (r) {
        vk_pc_RMSNORM qn;
        VK_PC_GET(r, RMSNORM, qn);
        eps = qn.eps;
        flags |= 1; /* the per-head norm first */
        r->pipe = (uint16_t)hw;
        r->kind = VKC_ROPE;
        int var = vk_rec_var(c, hw, 0);
        if (var < 0) return;
        r->var = (uint8_t)var;
        memset(r->pc, 0, sizeof r->pc);
        r->buf[1] = 0; /* headwise works in place on binding 0 */
        r->off[1] = r->range[1] = 0;
        r->wmask = 1;
    } else {
        r = vk_rec_new(c, hw, VKC_ROPE);
        if (!r) return;
        vk_bind(r, 0, &c->act[buf], 1);
    }
    vk_bind(r, 3, tab, 0);
    VK_PC_SET(r, HEADWISE, {.n_heads = (uint32_t)n_head, .hd = (uint32_t)head_dim, .n_rot = (uint32_t)rope->n_rot, .flags = flags,
                            .eps = eps, .pos_delta = pd});
    r->grid[0] = (uint32_t)n_head;
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 1;
    c->fuse_idx = -1;
}

/* the window whose buffer is buf, or -1 */
static int vk_win_of(const moe_vk_backend *vk, VkBuffer buf) {
    for (uint32_t w = 0; w < vk->n_win; w++)
        if (vk->win[w].buf == buf) return (int)w;
    return -1;
}

/* Record ki (the last) is the k heads' headwise dispatch with the cache stores; if the record
   before it is the q heads' norm/rope of the same token positions and rope table, both become one
   attn_prep.comp dispatch at the q record's place (nothing ran between them). Otherwise, or when
   the two norm gains are not within VK_XBUFS weight windows of each other, they stay as they are. */
static void vk_fuse_prep(vk_ctx *c, int ki, const moe_attn *a) {
    int hw = c->kv_f16 ? VKP_HEADWISE_F16 : VKP_HEADWISE_F32;
    if (ki - 1 < (int)c->seg0 || c->fuse_idx >= ki - 1) return;
    vk_rec *qr = &c->recs[ki - 1], *kr = &c->recs[ki];
    vk_pc_HEADWISE qp, kp;
    VK_PC_GET(qr, HEADWISE, qp);
    VK_PC_GET(kr, HEADWISE, kp);
    if (qr->pipe != hw || qr->slot != kr->slot || qr->buf[0] != c->act[ACT_Q].buf || qp.n_heads != (uint32_t)a->n_head || qp.hd != kp.hd ||
        qp.n_rot != kp.n_rot || qp.pos_delta != kp.pos_delta || (qp.flags & ~1u) != 2u || (kp.flags & ~1u) != 14u ||
        qr->grid[1] != kr->grid[1] || qr->buf[3] != kr->buf[3] || qr->off[3] != kr->off[3] ||
        ((qp.flags & kp.flags & 1u) && qp.eps != kp.eps))
        return;
    /* the gains: binding 2 of each record, a range of a weight window */
    int wq = qp.flags & 1u ? vk_win_of(c->vk, qr->buf[2]) : -1, wk = kp.flags & 1u ? vk_win_of(c->vk, kr->buf[2]) : -1;
    if (((qp.flags & 1u) && wq < 0) || ((kp.flags & 1u) && wk < 0)) return;
    int w0 = wq < 0 ? (wk < 0 ? 0 : wk) : wk < 0 ? wq : wq < wk ? wq : wk;
    if ((wq >= 0 && wq - w0 >= VK_XBUFS) || (wk >= 0 && wk - w0 >= VK_XBUFS)) return;
    int pipe = c->kv_f16 ? VKP_ATTN_PREP_F16 : VKP_ATTN_PREP_F32;
    int var = vk_rec_var(c, pipe, 0);
    if (var < 0) return;
    vk_rec f;
    memset(&f, 0, sizeof f);
    f.pipe = (uint16_t)pipe;
    f.var = (uint8_t)var;
    f.kind = VKC_ROPE;
    f.slot = qr->slot; /* in a batch pass: the context whose step header (positions) it reads */
    for (int s = 0; s < VK_NB; s++) { /* bindings of the fused kernel: 0 q, 1 k, 2 V rows, 3 table, 4/5 caches */
        int from = s == 0 ? 0 : s == 1 ? 0 : s == 2 ? 1 : s;
        const vk_rec *src = s == 0 ? qr : kr;
        f.buf[s] = src->buf[from];
        f.off[s] = src->off[from];
        f.range[s] = src->range[from];
    }
    f.wmask = 1u | 2u | 16u | 32u;
    f.wmode = 2;
    f.win = (uint32_t)w0;
    VK_PC_SET(&f, ATTN_PREP, {.n_head = qp.n_heads, .n_kv = kp.n_heads, .hd = qp.hd, .n_rot = qp.n_rot,
                              .flags = (qp.flags & 1u) | ((kp.flags & 1u) << 1), .eps = qp.flags & 1u ? qp.eps : kp.eps,
                              .kvw = kp.kvw, .pos_delta = qp.pos_delta, .rows = kp.rows,
                              .gq_win = wq < 0 ? 0u : (uint32_t)(wq - w0), .gq_off = wq < 0 ? 0u : (uint32_t)(qr->off[2] / 4),
                              .gk_win = wk < 0 ? 0u : (uint32_t)(wk - w0), .gk_off = wk < 0 ? 0u : (uint32_t)(kr->off[2] / 4)});
    f.grid[0] = qp.n_heads + kp.n_heads;
    f.grid[1] = qr->grid[1];
    f.grid[2] = 1;
    *qr = f;
    c->n_recs--;
    /* bytes for the profile's GB/s: q and k heads read and written, V read, K and V cache rows written */
    double heads = (double)f.grid[1] * (qp.n_heads + kp.n_heads), kvh = (double)f.grid[1] * kp.n_heads;
    c->rec_cost[ki - 1][0] = 8.0 * heads * qp.hd + kvh * qp.hd * (4.0 + 2.0 * (c->kv_f16 ? 2 : 4));
    c->rec_cost[ki - 1][1] = 4.0 * heads * qp.hd;
}

static void vk_op_attention(void *be, const moe_attn *a, int n, int pos0) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << ACT_Q) | (a->store ? (1u << ACT_K) | (1u << ACT_V) : 0u), 1u << ACT_ATTN);
    int32_t pd = vk_pos_delta(c, pos0);
    uint32_t kvw = (uint32_t)(a->n_head_kv * a->head_dim), rows = (uint32_t)c->kv_rows[a->cache];
    VkDeviceSize lo = c->kv_off[a->cache], sz = c->kv_size[a->cache];
    vk_rec *r;
    if (!a->store) goto attend; /* a KV-shared layer reads what an earlier layer stored */
    /* the cache store rides on the K heads' norm/rope dispatch recorded just before, if any */
    int hw = c->kv_f16 ? VKP_HEADWISE_F16 : VKP_HEADWISE_F32;
    for (int i = c->n_recs - 1; i >= 0 && i >= c->n_recs - 2; i--) {
        vk_rec *q = &c->recs[i];
        if (q->pipe == hw && q->slot == c->cur_slot && q->buf[0] == c->act[ACT_K].buf && q->grid[0] == (uint32_t)a->n_head_kv && q->grid[1] == (uint32_t)n &&
            q->pc[VK_PC_WORD(HEADWISE, pos_delta)] == (uint32_t)pd && !(q->pc[VK_PC_WORD(HEADWISE, flags)] & 12u)) {
            vk_bind(q, 1, &c->act[ACT_V], 0);
            vk_bind_range(q, 4, c->kc.buf, lo, sz, 1);
            vk_bind_range(q, 5, c->vc.buf, lo, sz, 1);
            q->pc[VK_PC_WORD(HEADWISE, flags)] |= 12u; /* and the K and V cache stores */
            q->pc[VK_PC_WORD(HEADWISE, kvw)] = kvw;
            q->pc[VK_PC_WORD(HEADWISE, rows)] = rows;
            if (i == c->n_recs - 1) vk_fuse_prep(c, i, a);
            goto attend;
        }
    }
    r = vk_rec_new(c, c->kv_f16 ? VKP_KVSTORE_F16 : VKP_KVSTORE_F32, VKC_KVSTORE);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_K], 0);
    vk_bind(r, 1, &c->act[ACT_V], 0);
    vk_bind_range(r, 4, c->kc.buf, lo, sz, 1);
    vk_bind_range(r, 5, c->vc.buf, lo, sz, 1);
    VK_PC_SET(r, KVSTORE, {kvw, pd, rows});
    r->grid[0] = vk_div_up(kvw, 2u * k_vk_plain[VKP_KVSTORE_F16 - VKP_ADD].wg);
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 2;
attend:;
    /* a decode token over a long range: split the keys (see VK_SPLIT_MIN). The chunk count comes
       from this step's position, so it is part of the records: a replayed command buffer always
       has the count it was recorded with for the same range of positions */
    const int tiled = n > VK_TILE_MIN && (a->head_dim == 32 || a->head_dim == 64 || a->head_dim == 128);
    /* attn.comp serves gw query heads of one KV group per workgroup: the largest divisor of the
       group size up to VK_ATTN_GW (registers and shared memory grow with it) */
    uint32_t grp = a->n_head_kv > 0 && a->n_head % a->n_head_kv == 0 ? (uint32_t)(a->n_head / a->n_head_kv) : 1, gw = 1;
    for (uint32_t g = 1; g <= VK_ATTN_GW && g <= grp; g++)
        if (grp % g == 0) gw = g;
    uint32_t n_split = 1, chunk = 0, wgs = (uint32_t)a->n_head / gw;
    if (n == 1) {
        int p0 = a->window && pos0 >= a->window ? pos0 - a->window + 1 : 0;
        uint32_t keys = (uint32_t)(pos0 - p0 + 1);
        if (keys > VK_SPLIT_MIN && (wgs <= VK_SPLIT_TARGET / 4 || keys > VK_SPLIT_LONG)) {
            /* halve the chunks (not below VK_SPLIT_CHUNK_MIN) while fewer than
               VK_SPLIT_TARGET workgroups would share the work: with whole KV groups per
               workgroup there are only n_head / gw of them per chunk */
            chunk = VK_SPLIT_CHUNK;
            while (chunk > VK_SPLIT_CHUNK_MIN && vk_div_up(keys, chunk) * wgs < VK_SPLIT_TARGET && vk_div_up(keys, chunk / 2) <= VK_SPLIT_MAX) chunk /= 2;
            while (vk_div_up(keys, chunk) > VK_SPLIT_MAX) chunk *= 2;
            n_split = vk_div_up(keys, chunk);
        }
    }
    int pipe = n_split > 1 ? (c->kv_f16 ? VKP_ATTN_SPLIT_F16 : VKP_ATTN_SPLIT_F32)
               : tiled     ? (c->kv_f16 ? VKP_ATTN_TILE_F16 : VKP_ATTN_TILE_F32)
                           : (c->kv_f16 ? VKP_ATTN_F16 : VKP_ATTN_F32);
    VkDeviceSize cnt = vk_split_counters(c->w), parts = n_split * (VkDeviceSize)a->n_head * (VkDeviceSize)(a->head_dim + 2) * 4;
    if (n_split > 1 && parts + cnt > c->split.size) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: split attention partials exceed their buffer");
        return;
    }
    r = vk_rec_new_spec(c, pipe, (uint32_t)a->head_dim | (tiled ? 0u : gw << 16), VKC_ATTN);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_Q], 0);
    if (n_split > 1) { /* partials, the output and the arrival counters (see attn.comp) */
        vk_bind_range(r, 1, c->split.buf, c->split.off, parts, 1);
        vk_bind(r, 2, &c->act[ACT_ATTN], 1);
        vk_bind_range(r, 3, c->split.buf, c->split.off + c->split.size - cnt, (VkDeviceSize)wgs * 4, 1);
    } else {
        vk_bind(r, 1, &c->act[ACT_ATTN], 1);
    }
    vk_bind_range(r, 4, c->kc.buf, lo, sz, 0);
    vk_bind_range(r, 5, c->vc.buf, lo, sz, 0);
    VK_PC_SET(r, ATTN, {(uint32_t)a->n_head, (uint32_t)a->n_head_kv, (uint32_t)a->head_dim, kvw, a->scale, pd, (uint32_t)a->window, rows, chunk, (uint32_t)n});
    r->grid[0] = tiled ? (uint32_t)a->n_head : (uint32_t)a->n_head / gw;
    r->grid[1] = tiled ? vk_div_up((uint64_t)n, VK_TILE_Q) : (uint32_t)n;
    r->grid[2] = n_split;
    {
        double keys = 0;
        for (int i = 0; i < n; i++) {
            int pos = pos0 + i, p0 = a->window && pos >= a->window ? pos - a->window + 1 : 0;
            keys += pos - p0 + 1;
        }
        /* the split path also writes and reads back its partials and merges them */
        vk_cost(c, 2.0 * keys * kvw * (c->kv_f16 ? 2 : 4) + 8.0 * n * a->n_head * a->head_dim + (n_split > 1 ? 8.0 * (double)parts : 0),
                4.0 * keys * a->n_head * a->head_dim + (n_split > 1 ? 2.0 * n_split * a->n_head * a->head_dim : 0));
    }
    c->fuse_idx = -1;
}

/* a weight's single part as a plain binding (1-D f32 vectors: norms, scales) */
static void vk_bind_vector(vk_ctx *c, vk_rec *r, int slot, const vk_wt *wt) {
    const vk_part *p = &c->vk->parts[wt->part0];
    vk_bind_range(r, slot, c->vk->win[p->win].buf, p->off, p->bytes, 0);
}

static void vk_op_scale(void *be, int buf, int n, int width, const moe_weight *w, float s) {
    vk_ctx *c = be;
    const vk_wt *wt = w ? vk_wt_of(c, w) : NULL;
    if (c->err || n <= 0 || (w && !wt)) return;
    vk_pn_touch(c, 1u << buf, 1u << buf);
    vk_rec *r = vk_rec_new(c, VKP_SCALE, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[buf], 1);
    if (wt) vk_bind_vector(c, r, 2, wt);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    VK_PC_SET(r, SCALE, {.count = (uint32_t)count, .width = (uint32_t)width, .has_w = wt != NULL, .s = s});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[VKP_SCALE - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

static void vk_op_copy(void *be, int dst, int src, int n, int width) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, 1u << src, 1u << dst);
    vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
    if (!r) return;
    vk_bind_range(r, 0, c->act[src].buf, 0, (VkDeviceSize)n * (VkDeviceSize)width * 4, 0);
    vk_bind_range(r, 1, c->act[dst].buf, 0, 0, 1);
    c->fuse_idx = -1;
}

static void vk_op_glu(void *be, int dst, int gate, int up, int up_col0, int up_stride, int n, int width, int act) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << gate) | (1u << up), 1u << dst);
    vk_rec *r = vk_rec_new(c, VKP_GLU, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[gate], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    vk_bind(r, 2, &c->act[up], 0);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    VK_PC_SET(r, GLU, {.count = (uint32_t)count, .width = (uint32_t)width, .up_col0 = (uint32_t)up_col0, .up_stride = (uint32_t)up_stride,
                       .act = (uint32_t)act});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[VKP_GLU - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

static void vk_op_softcap(void *be, int buf, int n, int width, float cap) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, 1u << buf, 1u << buf);
    vk_rec *r = vk_rec_new(c, VKP_SOFTCAP, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[buf], 1);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    VK_PC_SET(r, SOFTCAP, {.count = (uint32_t)count, .cap = cap});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[VKP_SOFTCAP - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

static void vk_op_add(void *be, int dst, int src, int n, int width) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << src) | (1u << dst), 1u << dst);
    /* fold into the kernel that just wrote src: it adds into dst instead (residual adds) */
    if (c->fuse_idx >= 0 && c->fuse_idx == c->n_recs - 1 && c->fuse_role == src && c->fuse_rows == n && dst != src &&
        c->act[src].size == c->act[dst].size) {
        vk_rec *r = &c->recs[c->fuse_idx];
        vk_bind(r, 1, &c->act[dst], 1);
        r->pc[c->fuse_acc] = 1;
        c->fuse_idx = -1;
        return;
    }
    vk_rec *r = vk_rec_new(c, VKP_ADD, VKC_ADD);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    VK_PC_SET(r, ADD, {(uint32_t)count});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[0].wg), 1);
    c->fuse_idx = -1;
}

/* decode routing as one route_mv.comp dispatch: the router logits of the n tokens into
   ACT_ROUTER and, by the last workgroup of each token, its top-k into aux; a pending RMSNorm of
   src is applied on the fly as by the matrix-vector matmul */
static void vk_route_mv(vk_ctx *c, const moe_weight *router, const moe_route *rt, int src, int n, const vk_wt *ws) {
    const vk_wt *wt = vk_wt_of(c, router);
    const vk_part *p = &c->vk->parts[wt->part0];
    uint32_t K = (uint32_t)router->ne[0], E = (uint32_t)router->ne[1];
    int inl = c->pn.active && src == c->pn.dst && n <= c->pn.rows && (int)K == c->pn.width;
    if (!inl) vk_pn_touch(c, 1u << src, 1u << ACT_ROUTER);
    vk_rec *r = vk_rec_new(c, VKP_TYPED(VKK_ROUTE, vk_type_index(router->type)), VKC_ROUTE);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 2, &c->aux, 1);
    if (ws) vk_bind_vector(c, r, 4, ws);
    vk_bind(r, 5, &c->act[ACT_ROUTER], 1);
    vk_bind_part(r, p);
    uint32_t nblk = vk_div_up(E, VK_MV_ROWS);
    VK_PC_SET(r, ROUTE, {.K = K, .M = E, .row_bytes = (uint32_t)router->row_bytes, .nblk = nblk, .x_stride = K, .k_used = (uint32_t)rt->k,
                         .rnorm = (uint32_t)rt->norm, .ids_off = c->ids_off, .w_off = c->w_off, .has_scale = ws != NULL, .cnt_off = c->cnt_off});
    if (inl) {
        vk_pn_inline(c, r, 3, 1, VK_PC_WORD(ROUTE, eps), VK_PC_WORD(ROUTE, norm));
        vk_pn_touch(c, 0, 1u << ACT_ROUTER);
    }
    vk_grid_fold(r, nblk, (uint32_t)n);
    vk_cost(c, (double)E * (double)router->row_bytes + 4.0 * n * ((double)K + E), 2.0 * n * (double)K * E);
}

/* route: router logits (a matmul into ACT_ROUTER), then on the GPU the softmax, top-k and
   renormalisation per token; for matmul-size steps also the grouping of (token, slot) pairs by
   expert into work items. The choice stays on the device. Decode steps do it all in one dispatch
   (vk_route_mv). */
static void vk_op_route(void *be, const moe_weight *router, const moe_route *rt, int src, int n) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    uint32_t E = (uint32_t)rt->n_expert, k = (uint32_t)rt->k;
    c->route_k = k;
    c->route_n = n;
    const vk_wt *ws = rt->expert_scale ? vk_wt_of(c, rt->expert_scale) : NULL;
    const vk_wt *wr = router ? vk_wt_of(c, router) : NULL;
    if (wr && n <= VK_MV_MAX && wr->n_parts == 1 && router->ne[1] == rt->n_expert) {
        vk_route_mv(c, router, rt, src, n, ws);
        c->fuse_idx = -1;
        return;
    }
    if (router) vk_op_matmul(be, ACT_ROUTER, router, src, 0, n);
    vk_pn_touch(c, 1u << ACT_ROUTER, 0);
    vk_rec *r = vk_rec_new(c, VKP_TOPK, VKC_TOPK);
    if (!r) return;
    vk_bind(r, 2, &c->aux, 1);
    vk_bind(r, 5, &c->act[ACT_ROUTER], 0);
    if (ws) vk_bind_vector(c, r, 4, ws);
    VK_PC_SET(r, TOPK, {.E = E, .k_used = k, .norm = (uint32_t)rt->norm, .ids_off = c->ids_off, .w_off = c->w_off, .has_scale = ws != NULL});
    r->grid[0] = (uint32_t)n;
    r->grid[1] = r->grid[2] = 1;
    if (n > VK_MV_MAX) { /* group the (token, slot) pairs by expert into work items */
        r = vk_rec_new(c, VKP_MOE_SORT, VKC_SORT);
        if (!r) return;
        vk_bind(r, 2, &c->aux, 1);
        VK_PC_SET(r, MOE_SORT, {E, (uint32_t)n * k, c->ids_off, c->list_off, c->pos_off, c->items_off});
        r->grid[0] = r->grid[1] = r->grid[2] = 1;
    }
    c->fuse_idx = -1;
}

/* expert gate and up of every routed pair into h: fused when both have one type (mode 1),
   else gate (mode 3) then up (mode 4); the kernels apply the activation */
static void vk_op_experts_glu(void *be, const moe_weight *gate, const moe_weight *up, int act, int src, int n) {
    vk_ctx *c = be;
    const vk_wt *wg = vk_wt_of(c, gate), *wu = vk_wt_of(c, up);
    if (!wg || !wu || c->err || n <= 0) return;
    if (act != MOE_ACT_SILU && act != MOE_ACT_GELU_TANH) {
        vk_ctx_fail(c, MOE_ERR_UNSUPPORTED, "Vulkan: expert activation %d is not implemented yet", act);
        return;
    }
    moe_vk_backend *vk = c->vk;
    if (vk_tiered(vk)) { /* the route op reaches the host: the layer's experts come from the host tier first */
        vk_xg_route_sync(c, wg, n);
        if (c->err) return;
    }
    uint32_t k = (uint32_t)c->route_k, ff = (uint32_t)gate->ne[1], D = (uint32_t)gate->ne[0];
    int tg = vk_type_index(gate->type), tu = vk_type_index(up->type);
    int inl = n <= VK_MV_MAX && c->pn.active && src == c->pn.dst && n <= c->pn.rows && (int)D == c->pn.width;
    c->step_evals += (uint64_t)n * k;
    vk_pn_touch(c, inl ? 0u : 1u << src, 0);
    int mv = n <= VK_MV_MAX;
    for (int pass = 0; pass < (tg == tu ? 1 : 2); pass++) {
        int mode = tg == tu ? 1 : pass == 0 ? 3 : 4;
        int t = mode == 4 ? tu : tg;
        const moe_weight *mw = mode == 4 ? up : gate;
        int cm = vk->coopmat && mw->type != MOE_TYPE_F32; /* as vk_op_matmul: f32 weights keep f32 tiles */
        int pipe = VKP_TYPED(mv ? VKK_MV : mode == 1 ? (cm ? VKK_MMCMG : VKK_MMG) : (cm ? VKK_MMCM : VKK_MM), t);
        vk_rec *r = vk_rec_new(c, pipe, mv ? VKC_MV_GATEUP : VKC_MM_GATEUP);
        if (!r) return;
        vk_bind(r, 0, &c->act[src], 0);
        vk_bind(r, 1, &c->h, 1);
        vk_bind(r, 2, &c->aux, 0);
        vk_bind(r, 3, &vk->tables, 0);
        r->wmode = 2;
        r->win = wg->win0;
        uint32_t nblk = vk_div_up(ff, mv ? VK_MV_ROWS : 64);
        if (mv) VK_PC_SET(r, MV, {.K = D, .M = ff, .row_bytes = (uint32_t)mw->row_bytes, .nblk = nblk, .x_stride = D, .y_stride = ff,
                                  .mode = (uint32_t)mode, .tbl0 = wg->tbl, .tbl1 = wu->tbl, .k_used = k, .ids_off = c->ids_off, .w_off = c->w_off,
                                  .act = (uint32_t)act});
        else VK_PC_SET(r, MM, {.K = D, .M = ff, .row_bytes = (uint32_t)mw->row_bytes, .nblk = nblk, .x_stride = D, .y_stride = ff,
                               .mode = (uint32_t)mode, .tbl0 = wg->tbl, .tbl1 = wu->tbl, .k_used = k, .list_off = c->list_off,
                               .items_off = c->items_off, .act = (uint32_t)act});
        if (inl) vk_pn_inline(c, r, 4, 5, VK_PC_WORD(MV, eps), VK_PC_WORD(MV, norm));
        vk_grid_fold(r, nblk, mv ? (uint32_t)n * k : c->max_items);
        { /* the routed experts are not known here: min(n_expert, n·k) of them */
            double E = (double)gate->ne[2], ex = (double)n * k < E ? (double)n * k : E, parts = mode == 1 ? 2 : 1;
            vk_cost(c, ex * parts * (double)mw->expert_bytes + 4.0 * ((double)n * D + (double)n * k * ff), 2.0 * parts * n * k * (double)D * ff);
        }
    }
    if (vk->xg && !vk->xc) vk_xg_log_route(c, wg, n); /* GPU expert slot cache: the routed ids to the host after the step */
    c->fuse_idx = -1;
}

/* expert down: the matrix-vector kernel sums each token's k experts itself; the matmul writes
   per-pair rows that a combine pass weights and sums */
static void vk_op_experts_down(void *be, int dst, const moe_weight *down, int n) {
    vk_ctx *c = be;
    const vk_wt *wd = vk_wt_of(c, down);
    if (!wd || c->err || n <= 0) return;
    vk_pn_touch(c, 0, 1u << dst);
    moe_vk_backend *vk = c->vk;
    uint32_t k = (uint32_t)c->route_k, ff = (uint32_t)down->ne[0], D = (uint32_t)down->ne[1];
    int td = vk_type_index(down->type), mv = n <= VK_MV_MAX;
    int mmk = vk->coopmat && down->type != MOE_TYPE_F32 ? VKK_MMCM : VKK_MM; /* as vk_op_matmul */
    vk_rec *r = vk_rec_new_spec(c, VKP_TYPED(mv ? VKK_MV : mmk, td), mv ? VK_MV_WG_DOWN : 0, mv ? VKC_MV_DOWN : VKC_MM_DOWN);
    if (!r) return;
    vk_bind(r, 0, &c->h, 0);
    vk_bind(r, 1, mv ? &c->act[dst] : &c->p, 1);
    vk_bind(r, 2, &c->aux, 0);
    vk_bind(r, 3, &vk->tables, 0);
    r->wmode = 2;
    r->win = wd->win0;
    uint32_t nblk = vk_div_up(D, mv ? VK_MV_ROWS : 64);
    if (mv) VK_PC_SET(r, MV, {.K = ff, .M = D, .row_bytes = (uint32_t)down->row_bytes, .nblk = nblk, .x_stride = ff, .y_stride = D,
                              .mode = 2, .tbl0 = wd->tbl, .k_used = k, .ids_off = c->ids_off, .w_off = c->w_off});
    else VK_PC_SET(r, MM, {.K = ff, .M = D, .row_bytes = (uint32_t)down->row_bytes, .nblk = nblk, .x_stride = ff, .y_stride = D,
                           .mode = 2, .tbl0 = wd->tbl, .k_used = k, .list_off = c->list_off, .items_off = c->items_off});
    vk_grid_fold(r, nblk, mv ? (uint32_t)n : c->max_items);
    {
        double E = (double)down->ne[2], ex = (double)n * k < E ? (double)n * k : E;
        vk_cost(c, ex * (double)down->expert_bytes + 4.0 * ((double)n * k * ff + (double)n * D), 2.0 * n * k * (double)D * ff);
    }
    c->fuse_idx = -1;
    if (mv) {
        vk_mark_fusable(c, dst, n, VK_PC_WORD(MV, acc));
        return;
    }
    r = vk_rec_new(c, VKP_MOE_COMBINE, VKC_COMBINE);
    if (!r) return;
    vk_bind(r, 0, &c->p, 0);
    vk_bind(r, 1, &c->act[dst], 1);
    vk_bind(r, 2, &c->aux, 0);
    VK_PC_SET(r, MOE_COMBINE, {.D = D, .k_used = k, .w_off = c->w_off, .pos_off = c->pos_off});
    r->grid[0] = vk_div_up(D, k_vk_plain[VKP_MOE_COMBINE - VKP_ADD].wg);
    r->grid[1] = (uint32_t)n;
    r->grid[2] = 1;
    vk_mark_fusable(c, dst, n, VK_PC_WORD(MOE_COMBINE, acc));
}

/* ---- GPU expert slot cache: the per-step side (see the banner before vk_upload_weights) ---- */

/* the step copies the layer's routed ids into the context's host-visible route log */
static void vk_xg_log_route(vk_ctx *c, const vk_wt *wg, int n) {
    moe_vk_backend *vk = c->vk;
    int l = vk_weight_layer((int)(wg - vk->wts));
    if (l < 0 || l >= vk->xg->L || !c->rlog.buf) return;
    uint32_t pairs = (uint32_t)n * (uint32_t)c->route_k;
    vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
    if (!r) return;
    vk_bind_range(r, 0, c->aux.buf, (VkDeviceSize)c->ids_off * 4, (VkDeviceSize)pairs * 4, 0);
    vk_bind_range(r, 1, c->rlog.buf, (VkDeviceSize)l * c->xg_stride * 4, 0, 1);
    c->xg_n[l] = (int32_t)pairs;
}

/* table entry j says (win, off) in the host's copy (mirror 0) over a host tier */
static void vk_xg_mirror_set(vk_xg *x, uint32_t j, uint32_t win, uint32_t off) {
    uint32_t *m = (uint32_t *)x->mirror[0].map;
    m[2 * j] = win;
    m[2 * j + 1] = off;
}

static void vk_xg_queue_copy(vk_ctx *c, VkBuffer src, VkBuffer dst, VkDeviceSize so, VkDeviceSize d_off, VkDeviceSize n) {
    struct vk_xf *f = &c->xf[c->n_xf++];
    f->src = src;
    f->dst = dst;
    f->cp.srcOffset = so;
    f->cp.dstOffset = d_off;
    f->cp.size = n;
}

/* Over a host tier, at the route op of MoE layer l (the step's records so far go to the queue,
   one wait): the layer's routed ids are read from the route log; experts in a device slot are
   hits; the missed ones are gathered from the host cache into the stage (their homes), take
   slots the eviction policy gives up (never one this layer already uses in this step) and their
   copies stage -> slot and the layer's table range are queued to open the next submission.
   Missed experts left without a slot are read from the stage over the bus. Then the previous
   step's choice of the next MoE layer goes to the host cache as a prefetch. */
static void vk_xg_route_sync(vk_ctx *c, const vk_wt *wg, int n) {
    moe_vk_backend *vk = c->vk;
    vk_xg *x = vk->xg;
    int l = vk_weight_layer((int)(wg - vk->wts)), E = x->E;
    if (l < 0 || l >= x->L || !x->lt_n[l]) return;
    vk_xg_log_route(c, wg, n);
    moe_status st = vk_seg_run(c, 0);
    if (st) {
        vk_ctx_fail(c, st, "%s", moe_last_error());
        return;
    }
    uint32_t np = (uint32_t)c->xg_n[l], cnt[VK_MAX_EXPERTS];
    const uint32_t *ids = (const uint32_t *)c->rlog.map + (size_t)l * c->xg_stride;
    memset(cnt, 0, (size_t)E * sizeof cnt[0]);
    for (uint32_t p = 0; p < np; p++)
        if (ids[p] < (uint32_t)E) cnt[ids[p]]++;
    int32_t s0 = x->s0[l], ns = x->ns[l], nm = 0, nd = 0;
    moe_xs_pol *pol = &x->pol[l];
    uint64_t step_tick = pol->tick; /* slots touched after this serve this step */
    for (int e = 0; e < E; e++)
        if (cnt[e]) c->xg_ids[nd++] = e;
    moe_xs_judge(vk->xc, l, c->xg_pred + (size_t)l * (size_t)E, c->xg_ids, nd); /* the last prefetch for this layer */
    for (int e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        int32_t s = x->map[(size_t)l * (size_t)E + (size_t)e];
        if (s >= 0) {
            c->xg_hits += cnt[e];
            moe_xs_touch(pol, s - s0, cnt[e], 0);
            continue;
        }
        c->xg_misses += cnt[e];
        c->xg_ids[nm] = e;
        c->xg_pairs[nm] = (int32_t)cnt[e];
        for (int t = 0; t < x->lt_n[l]; t++) {
            uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)e;
            c->xg_dst[(size_t)nm * MOE_XS_MAX_T + (size_t)t] = x->stage[x->home[2 * j]].map + x->home[2 * j + 1];
        }
        nm++;
    }
    if (nm && (st = moe_xs_gather(vk->xc, l, c->xg_ids, nm, c->xg_pairs, c->xg_dst, &c->xcnt))) { /* nothing changed on the device side */
        vk_ctx_fail(c, st, "%s", moe_last_error());
        return;
    }
    for (int i = 0; i < nm; i++) {
        int e = c->xg_ids[i];
        c->xg_bytes += x->unit[l]; /* to the device: copied into a slot, or read from the stage by the kernels */
        /* a step larger than the layer's slots leaves the protected ones alone (the rest come from the stage) */
        int32_t v = ns ? moe_xs_victim(pol, NULL, x->state + s0, step_tick, nd > ns) : -1;
        if (v < 0) { /* every slot serves this step: from the stage */
            moe_xs_pol_count(pol, e, (uint32_t)c->xg_pairs[i]);
            continue;
        }
        int32_t s = s0 + v;
        if (x->key[s] >= 0) { /* the evicted expert's entries back to its home (the stage) */
            int old = x->key[s];
            x->map[(size_t)l * (size_t)E + (size_t)old] = -1;
            for (int t = 0; t < x->lt_n[l]; t++) {
                uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)old;
                vk_xg_mirror_set(x, j, x->home[2 * j], x->home[2 * j + 1]);
            }
        }
        x->key[s] = e;
        x->map[(size_t)l * (size_t)E + (size_t)e] = s;
        x->state[s] = 2;
        moe_xs_touch(pol, v, (uint32_t)c->xg_pairs[i], 1);
        for (int t = 0; t < x->lt_n[l]; t++) {
            uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)e;
            VkDeviceSize so = x->slot_off[s] + x->lt_roff[(size_t)l * VK_XG_T + (size_t)t];
            vk_xg_queue_copy(c, x->stage[x->home[2 * j]].buf, vk->win[x->win0[l] + x->slot_win[s]].buf, x->home[2 * j + 1], so,
                             x->lt_len[(size_t)l * VK_XG_T + (size_t)t]);
            vk_xg_mirror_set(x, j, x->slot_win[s], (uint32_t)so);
        }
    }
    if (nm) /* the layer's table range, tensor by tensor */
        for (int t = 0; t < x->lt_n[l]; t++) {
            VkDeviceSize j0 = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t];
            vk_xg_queue_copy(c, x->mirror[0].buf, vk->tables.buf, j0 * 8, j0 * 8, (VkDeviceSize)E * 8);
        }
    /* prefetch: the next MoE layer's experts of the previous step, where no slot holds them */
    int l2 = l + 1;
    while (l2 < x->L && !x->lt_n[l2]) l2++;
    if (l2 < x->L && c->xg_n[l2] > 0) {
        const uint32_t *ids2 = (const uint32_t *)c->rlog.map + (size_t)l2 * c->xg_stride;
        int n2 = 0;
        memset(cnt, 0, (size_t)E * sizeof cnt[0]);
        for (int32_t p = 0; p < c->xg_n[l2]; p++)
            if (ids2[p] < (uint32_t)E && !cnt[ids2[p]]++ && x->map[(size_t)l2 * (size_t)E + ids2[p]] < 0) c->xg_ids[n2++] = (int32_t)ids2[p];
        if (n2 && moe_xs_prefetch(vk->xc, l2, c->xg_ids, NULL, n2, &c->xcnt)) /* one class: the previous step's choice */
            for (int i = 0; i < n2; i++) c->xg_pred[(size_t)l2 * (size_t)E + (size_t)c->xg_ids[i]] = 1;
    }
}

/* Starts recording the current fill command buffer (waits for its previous use first). */
static moe_status vk_xg_cb_begin(moe_vk_backend *vk, vk_xg *x) {
    int i = x->cur;
    if (x->pending[i]) {
        x->pending[i] = 0;
        moe_status st = vk_wait_fence(vk, x->fence[i], "expert slot fills");
        if (st) return st;
    }
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO, NULL, VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT, NULL};
    VkResult r = vk->f.ResetCommandBuffer(x->cb[i], 0);
    if (r == VK_SUCCESS) r = vk->f.BeginCommandBuffer(x->cb[i], &bi);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: recording expert slot fills failed (%s)", vk_result_str(r));
    /* earlier steps (any context) read the slots and the table: they finish before the copies */
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT | VK_ACCESS_HOST_WRITE_BIT,
                          VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    vk->f.CmdPipelineBarrier(x->cb[i], VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                             VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    return MOE_OK;
}

/* table entry j now says (win, off): through this command buffer's mirror */
static void vk_xg_set_entry(moe_vk_backend *vk, vk_xg *x, uint32_t j, uint32_t win, uint32_t off) {
    uint32_t *m = (uint32_t *)x->mirror[x->cur].map;
    m[2 * j] = win;
    m[2 * j + 1] = off;
    VkBufferCopy cp = {(VkDeviceSize)j * 8, (VkDeviceSize)j * 8, 8};
    vk->f.CmdCopyBuffer(x->cb[x->cur], x->mirror[x->cur].buf, vk->tables.buf, 1, &cp);
}

/* After a step: counts the step's routed experts as hits (in a slot) or misses (read from their
   home), gives missed experts slots (the eviction policy of section 8, per layer) and queues the
   copies and table updates; nothing waits for them. */
static moe_status vk_xg_after_step(vk_ctx *c) {
    moe_vk_backend *vk = c->vk;
    vk_xg *x = vk->xg;
    int L = x->L, E = x->E, recording = 0;
    moe_status st = MOE_OK;
    uint32_t cnt[VK_MAX_EXPERTS];
    pthread_mutex_lock(&x->mu);
    if (x->reset) { /* a failed submission left the host's view ahead of the table: every entry to its home again */
        if ((st = vk_xg_cb_begin(vk, x))) goto out;
        recording = 1;
        memcpy(x->mirror[x->cur].map, x->home, (size_t)x->n_tbl * 8);
        VkBufferCopy cp = {0, 0, (VkDeviceSize)x->n_tbl * 8};
        vk->f.CmdCopyBuffer(x->cb[x->cur], x->mirror[x->cur].buf, vk->tables.buf, 1, &cp);
        VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT, VK_ACCESS_TRANSFER_WRITE_BIT};
        vk->f.CmdPipelineBarrier(x->cb[x->cur], VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    }
    for (int l = 0; l < L && !st; l++) {
        uint32_t np = (uint32_t)c->xg_n[l];
        if (!np) continue;
        c->xg_n[l] = 0;
        const uint32_t *ids = (const uint32_t *)c->rlog.map + (size_t)l * c->xg_stride;
        memset(cnt, 0, (size_t)E * sizeof cnt[0]);
        for (uint32_t p = 0; p < np; p++)
            if (ids[p] < (uint32_t)E) cnt[ids[p]]++;
        int32_t s0 = x->s0[l], ns = x->ns[l], nd = 0;
        moe_xs_pol *pol = &x->pol[l];
        uint64_t step_tick = pol->tick; /* slots touched after this were used by this step */
        for (int e = 0; e < E; e++) {
            nd += cnt[e] > 0;
            int32_t s = cnt[e] ? x->map[(size_t)l * (size_t)E + (size_t)e] : -1;
            if (s < 0) continue;
            c->xg_hits += cnt[e];
            moe_xs_touch(pol, s - s0, cnt[e], 0);
        }
        for (int e = 0; e < E && !st; e++) {
            if (!cnt[e] || x->map[(size_t)l * (size_t)E + (size_t)e] >= 0) continue;
            c->xg_misses += cnt[e];
            c->xg_bytes += x->unit[l]; /* read over the bus from its home */
            /* a step larger than the layer's slots leaves the protected ones alone */
            int32_t v = ns ? moe_xs_victim(pol, NULL, x->state + s0, step_tick, nd > ns) : -1;
            if (v < 0) { /* every slot serves this step: read from its home */
                moe_xs_pol_count(pol, e, cnt[e]);
                continue;
            }
            int32_t s = s0 + v;
            if (!recording) {
                if ((st = vk_xg_cb_begin(vk, x))) break;
                recording = 1;
            }
            if (x->key[s] >= 0) { /* the evicted expert is read from its home again */
                int old = x->key[s];
                x->map[(size_t)l * (size_t)E + (size_t)old] = -1;
                for (int t = 0; t < x->lt_n[l]; t++) {
                    uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)old;
                    vk_xg_set_entry(vk, x, j, x->home[2 * j], x->home[2 * j + 1]);
                }
            }
            x->key[s] = e;
            x->map[(size_t)l * (size_t)E + (size_t)e] = s;
            x->state[s] = 2;
            moe_xs_touch(pol, v, cnt[e], 1);
            for (int t = 0; t < x->lt_n[l]; t++) {
                uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)e;
                VkBufferCopy cp = {x->home[2 * j + 1], x->slot_off[s] + x->lt_roff[(size_t)l * VK_XG_T + (size_t)t],
                                   x->lt_len[(size_t)l * VK_XG_T + (size_t)t]};
                vk->f.CmdCopyBuffer(x->cb[x->cur], vk->win[x->win0[l] + x->home[2 * j]].buf, vk->win[x->win0[l] + x->slot_win[s]].buf, 1, &cp);
            }
            /* the table may point at the slot only after the copy: a barrier between them */
            VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT, VK_ACCESS_TRANSFER_WRITE_BIT};
            vk->f.CmdPipelineBarrier(x->cb[x->cur], VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
            for (int t = 0; t < x->lt_n[l]; t++) {
                uint32_t j = x->lt_tbl[(size_t)l * VK_XG_T + (size_t)t] + (uint32_t)e;
                vk_xg_set_entry(vk, x, j, x->slot_win[s], (uint32_t)(x->slot_off[s] + x->lt_roff[(size_t)l * VK_XG_T + (size_t)t]));
            }
            c->xg_bytes += x->unit[l]; /* and copied into the slot */
        }
    }
    if (recording && !st) {
        VkCommandBuffer cb = x->cb[x->cur];
        VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, VK_ACCESS_TRANSFER_WRITE_BIT, VK_ACCESS_SHADER_READ_BIT};
        vk->f.CmdPipelineBarrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
        VkResult r = vk->f.EndCommandBuffer(cb);
        if (r != VK_SUCCESS) st = vk_fail(MOE_ERR_DEVICE, "Vulkan: recording expert slot fills failed (%s)", vk_result_str(r));
        if (!st) st = vk_submit(vk, cb, x->fence[x->cur], "expert slot fills");
        if (!st) {
            x->pending[x->cur] = 1;
            x->cur ^= 1;
            x->reset = 0;
        }
    }
    if (st && recording) { /* what this call changed never reached the table: forget every slot (their contents stay valid
                              for the entries still pointing at them until the reset above runs first on the queue) */
        x->reset = 1;
        for (int32_t s = 0; s < x->n_slots; s++) {
            x->key[s] = -1;
            x->state[s] = 0;
        }
        for (int l = 0; l < L; l++) moe_xs_pol_forget(&x->pol[l]);
        for (size_t i = 0; i < (size_t)L * (size_t)E; i++) x->map[i] = -1;
    }
out:
    pthread_mutex_unlock(&x->mu);
    return st;
}

/* device memory: weights (shared by the model's contexts), KV cache, scratch */
static void vk_stats(const void *be, moe_stats *out) {
    const vk_ctx *c = be;
    uint64_t s = c->h.size + c->p.size + c->aux.size + c->split.size + c->step.size + c->logits.size;
    for (int i = 0; i < c->n_rope; i++) s += c->rope[i].tab.size;
    for (int i = 0; i < ACT_COUNT; i++) s += c->act[i].size;
    out->gpu_bytes_weights += c->vk->weight_bytes + c->vk->tables.size;
    if (c->vk->xg) { /* the GPU expert slot cache: experts' host-visible homes; this context's hits and misses */
        out->host_bytes += c->vk->xg->host_bytes;
        out->expert_hits += c->xg_hits;
        out->expert_misses += c->xg_misses;
        out->expert_bytes_streamed += c->xg_bytes + c->xcnt.bytes; /* over a host tier: plus the bytes read from the file */
    }
    out->gpu_bytes_kv += c->kc.size + c->vc.size;
    out->gpu_bytes_scratch += s;
}

/* ---- profiling through the API (moe_ctx_profile) and the bandwidth probe ---- */
static double vk_now_s(void) {
#ifdef _WIN32
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (double)t.QuadPart / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
}

static moe_status vk_prof_pool(vk_ctx *c) {
    moe_vk_backend *vk = c->vk;
    if (c->qpool) return MOE_OK;
    if (!vk->timestamps) return vk_fail(MOE_ERR_UNSUPPORTED, "Vulkan: this queue has no timestamps: cannot profile");
    VkQueryPoolCreateInfo qci = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO, NULL, 0, VK_QUERY_TYPE_TIMESTAMP, 8192, 0};
    VkResult r = vk->f.CreateQueryPool(vk->dev, &qci, NULL, &c->qpool);
    if (r != VK_SUCCESS) return vk_fail(MOE_ERR_DEVICE, "Vulkan: creating a timestamp query pool failed (%s)", vk_result_str(r));
    c->q_cap = 8192;
    return MOE_OK;
}

static moe_status vk_profile(void *be, int on) {
    vk_ctx *c = be;
    if (on) {
        moe_status st = vk_prof_pool(c);
        if (st) return st;
    }
    memset(c->prof_ns, 0, sizeof c->prof_ns);
    memset(c->prof_n, 0, sizeof c->prof_n);
    memset(c->prof_bytes, 0, sizeof c->prof_bytes);
    memset(c->prof_flops, 0, sizeof c->prof_flops);
    memset(c->prof_steps, 0, sizeof c->prof_steps);
    memset(c->prof_tokens, 0, sizeof c->prof_tokens);
    memset(c->prof_total, 0, sizeof c->prof_total);
    c->profile = on;
    c->prof_env = 0;
    for (int i = 0; i < VK_CACHE; i++) c->cache[i].n = -1; /* recorded with or without timestamps */
    return MOE_OK;
}

static int vk_profile_get(const void *be, moe_profile_entry *out, int cap) {
    const vk_ctx *c = be;
    int n = 0;
    for (int ph = 0; ph < 2; ph++)
        for (int k = 0; k < VKC_COUNT; k++)
            for (int p = 0; p <= VKP_COUNT; p++) {
                if (!c->prof_n[ph][k][p]) continue;
                if (n < cap) {
                    moe_profile_entry *o = &out[n];
                    memset(o, 0, sizeof *o);
                    char name[48] = "copy";
                    if (p < VKP_ADD) snprintf(name, sizeof name, "%s_%s", k_vk_kind_names[p / VKT_COUNT], k_vk_type_names[p % VKT_COUNT]);
                    else if (p < VKP_COUNT) snprintf(name, sizeof name, "%s", k_vk_plain[p - VKP_ADD].name);
                    snprintf(o->kind, sizeof o->kind, "%.28s (%.16s)", k_vkc_names[k], name); /* 48 bytes: bounded parts */
                    o->decode = ph;
                    o->calls = (int32_t)c->prof_n[ph][k][p];
                    o->seconds = c->prof_ns[ph][k][p] * 1e-9;
                    o->bytes = c->prof_bytes[ph][k][p];
                    o->flops = c->prof_flops[ph][k][p];
                    o->tokens = c->prof_tokens[ph];
                }
                n++;
            }
    for (int i = 1; i < n && i < cap; i++) /* largest time first */
        for (int j = i; j > 0 && out[j].seconds > out[j - 1].seconds; j--) {
            moe_profile_entry t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
        }
    return n;
}

/* a plain copy kernel between two device buffers, VK_PROBE_REPS times; the fastest counts */
#define VK_PROBE_REPS 8
static moe_status vk_bandwidth_probe(void *be, double *read_gbs, double *copy_gbs) {
    vk_ctx *c = be;
    moe_vk_backend *vk = c->vk;
    if (c->dead) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
    VkDeviceSize bytes = (VkDeviceSize)256 << 20, lim = vk->props.limits.maxStorageBufferRange;
    if (bytes > lim) bytes = lim;
    bytes = bytes / (16 * 256 * 4) * (16 * 256 * 4);
    vk_buf a = {0}, b = {0};
    moe_status st = vk_buf_new(vk, &a, bytes, VK_MEM_DEVICE, "the probe's source");
    if (!st) st = vk_buf_new(vk, &b, bytes, VK_MEM_DEVICE, "the probe's destination");
    int ts = vk->timestamps && !vk_prof_pool(c);
    vk_rec recs[VK_PROBE_REPS];
    VkPipeline pl;
    int var = 0;
    if (!st) st = vk_pipe(vk, VKP_COPY, 0, &pl, &var);
    for (int i = 0; i < VK_PROBE_REPS && !st; i++) {
        vk_rec *r = &recs[i];
        memset(r, 0, sizeof *r);
        r->pipe = VKP_COPY;
        r->var = (uint8_t)var;
        r->kind = VKC_COPY;
        vk_bind(r, 0, i % 2 ? &b : &a, 0);
        vk_bind(r, 1, i % 2 ? &a : &b, 1);
        VK_PC_SET(r, COPY, {(uint32_t)(bytes / 16)});
        vk_grid_fold(r, bytes / 16 / k_vk_plain[VKP_COPY - VKP_ADD].wg, 1);
    }
    double best = 1e30;
    if (!st) {
        vk_cached *e = &c->cache[0]; /* its command buffer is borrowed: never found again */
        e->n = -1;
        int prof = c->profile;
        c->profile = ts;
        st = vk_record_cb(c, e->cb, recs, VK_PROBE_REPS);
        c->profile = prof;
        double t0 = vk_now_s();
        if (!st) st = vk_submit(vk, e->cb, c->fence, "the bandwidth probe");
        if (!st) st = vk_wait_fence(vk, c->fence, "the bandwidth probe");
        double wall = vk_now_s() - t0;
        uint64_t t[VK_PROBE_REPS + 1];
        if (!st && ts && vk->f.GetQueryPoolResults(vk->dev, c->qpool, 0, VK_PROBE_REPS + 1, sizeof t, t, 8,
                                                   VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT) == VK_SUCCESS) {
            for (int i = 1; i < VK_PROBE_REPS; i++) { /* the first one warms up */
                double dt = (double)((t[i + 1] - t[i]) & vk->ts_mask) * vk->ts_ns * 1e-9;
                if (dt > 0 && dt < best) best = dt;
            }
        } else if (!st) best = wall / VK_PROBE_REPS;
    }
    vk_buf_free(vk, &a);
    vk_buf_free(vk, &b);
    if (st) return st;
    if (read_gbs) *read_gbs = 2.0 * (double)bytes / best / 1e9;
    if (copy_gbs) *copy_gbs = 2.0 * (double)bytes / best / 1e9;
    return MOE_OK;
}

/* ---- hybrid models (Gated DeltaNet): gates, conv with state, the delta rule, the states ---- */
static void vk_op_split_heads(void *be, int dst_a, int dst_b, int src, int n, int n_head, int head_dim) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, 1u << src, (1u << dst_a) | (1u << dst_b));
    vk_rec *r = vk_rec_new(c, VKP_SPLIT_HEADS, VKC_COPY);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst_a], 1);
    vk_bind(r, 3, &c->act[dst_b], 1);
    uint64_t count = (uint64_t)n * (uint64_t)n_head * (uint64_t)head_dim;
    VK_PC_SET(r, SPLIT_HEADS, {.count = (uint32_t)count, .hd = (uint32_t)head_dim});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[VKP_SPLIT_HEADS - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

static void vk_op_sigmoid_mul(void *be, int dst, int gate, int n, int width) {
    vk_ctx *c = be;
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << dst) | (1u << gate), 1u << dst);
    vk_rec *r = vk_rec_new(c, VKP_SIGMOID_MUL, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[dst], 1);
    vk_bind(r, 2, &c->act[gate], 0);
    uint64_t count = (uint64_t)n * (uint64_t)width;
    VK_PC_SET(r, SIGMOID_MUL, {.count = (uint32_t)count});
    vk_grid_fold(r, vk_div_up(count, k_vk_plain[VKP_SIGMOID_MUL - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

static void vk_op_gate_rows(void *be, int dst, int src, const moe_weight *w, int n, int width) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (c->err || n <= 0 || !wt) return;
    vk_pn_touch(c, (1u << dst) | (1u << src), 1u << dst);
    vk_rec *r = vk_rec_new(c, VKP_ROW_GATE, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[src], 0);
    vk_bind(r, 1, &c->act[dst], 1);
    vk_bind_vector(c, r, 2, wt);
    VK_PC_SET(r, ROW_GATE, {.width = (uint32_t)width, .rows = (uint32_t)n});
    vk_grid_fold(r, (uint64_t)n, 1);
    c->fuse_idx = -1;
}

static int vk_dn_channels(const moe_deltanet *dn) { return 2 * dn->n_k_head * dn->k_dim + dn->n_v_head * dn->v_dim; }

static void vk_op_ssm_conv(void *be, const moe_deltanet *dn, const moe_weight *w, int n) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (c->err || n <= 0 || !wt) return;
    const moe_state_plan *sp = &c->w->states[dn->state];
    int C = vk_dn_channels(dn);
    vk_pn_touch(c, 1u << ACT_DN_QKV, 1u << ACT_DN_CONV);
    vk_rec *r = vk_rec_new(c, VKP_SSM_CONV, VKC_ELTWISE);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_DN_QKV], 0);
    vk_bind(r, 1, &c->act[ACT_DN_CONV], 1);
    vk_bind_vector(c, r, 2, wt);
    vk_bind_range(r, 3, c->st.buf, c->st_conv[dn->state], (VkDeviceSize)(sp->conv_elems ? sp->conv_elems : 1) * 4, 1);
    VK_PC_SET(r, SSM_CONV, {.C = (uint32_t)C, .K = (uint32_t)dn->conv_k, .n = (uint32_t)n});
    vk_grid_fold(r, vk_div_up((uint64_t)C, k_vk_plain[VKP_SSM_CONV - VKP_ADD].wg), 1);
    c->fuse_idx = -1;
}

/* the delta rule's first half, row by row: q̂ · k_dim^-1/2 and k̂ in place (moe_step_batch: once over all rows) */
static void vk_dn_l2norm(vk_ctx *c, const moe_deltanet *dn, int n) {
    if (c->err || n <= 0) return;
    vk_pn_touch(c, (1u << ACT_DN_CONV) | (1u << ACT_DN_BETA) | (1u << ACT_DN_ALPHA), (1u << ACT_DN_CONV) | (1u << ACT_DN_O));
    vk_rec *r = vk_rec_new(c, VKP_L2NORM, VKC_NORM);
    if (!r) return;
    vk_bind(r, 0, &c->act[ACT_DN_CONV], 1);
    VK_PC_SET(r, L2NORM, {.hd = (uint32_t)dn->k_dim, .heads = 2u * (uint32_t)dn->n_k_head, .stride = (uint32_t)vk_dn_channels(dn),
                          .rows = (uint32_t)n, .n_scaled = (uint32_t)dn->n_k_head, .scale = 1.0f / sqrtf((float)dn->k_dim), .eps = 1e-6f});
    vk_grid_fold(r, (uint64_t)n * 2u * (uint64_t)dn->n_k_head, 1);
}

/* the second half: the recurrence over the n tokens on the state, plain or chunked (WY) */
static void vk_dn_rule(vk_ctx *c, const moe_deltanet *dn, const moe_weight *a_coef, const moe_weight *dt_bias, int n) {
    const vk_wt *wa = vk_wt_of(c, a_coef), *wd = vk_wt_of(c, dt_bias);
    if (c->err || n <= 0 || !wa || !wd) return;
    const moe_state_plan *sp = &c->w->states[dn->state];
    int C = vk_dn_channels(dn);
    vk_rec *r;
    const vk_pc_DELTA_RULE pc = {.nk = (uint32_t)dn->n_k_head, .nv = (uint32_t)dn->n_v_head, .dk = (uint32_t)dn->k_dim, .dv = (uint32_t)dn->v_dim,
                                 .n = (uint32_t)n, .C = (uint32_t)C, .v_tiled = (uint32_t)dn->v_tiled, .grouped = (uint32_t)dn->ba_grouped};
    VkDeviceSize s_off = c->st_rec[dn->state], s_bytes = (VkDeviceSize)sp->rec_elems * 4;
    if (c->dn_chunk_min && n >= c->dn_chunk_min) { /* the chunked (WY) form: gates, per-chunk factors, the state */
        uint64_t chunks = ((uint64_t)n + VK_DN_CT - 1) / VK_DN_CT;
        if (!(r = vk_rec_new(c, VKP_DN_CHUNK_GATES, VKC_ATTN))) return;
        vk_bind(r, 1, &c->dn_scr, 1);
        vk_bind(r, 2, &c->act[ACT_DN_BETA], 0);
        vk_bind(r, 3, &c->act[ACT_DN_ALPHA], 0);
        vk_bind_vector(c, r, 5, wa);
        vk_bind_part(r, &c->vk->parts[wd->part0]);
        VK_PC_SET(r, DELTA_RULE, pc);
        vk_grid_fold(r, vk_div_up(chunks * (uint64_t)dn->n_v_head, k_vk_plain[VKP_DN_CHUNK_GATES - VKP_ADD].wg), 1);
        if (!(r = vk_rec_new(c, VKP_DN_CHUNK_PREP, VKC_ATTN))) return;
        vk_bind(r, 0, &c->act[ACT_DN_CONV], 0);
        vk_bind(r, 1, &c->dn_scr, 1);
        VK_PC_SET(r, DELTA_RULE, pc);
        vk_grid_fold(r, chunks * (uint64_t)dn->n_v_head, 1);
        if (!(r = vk_rec_new(c, VKP_DN_CHUNK_STATE, VKC_ATTN))) return;
        vk_bind(r, 0, &c->act[ACT_DN_CONV], 0);
        vk_bind(r, 1, &c->act[ACT_DN_O], 1);
        vk_bind(r, 2, &c->dn_scr, 0);
        vk_bind_range(r, 4, c->st.buf, s_off, s_bytes, 1);
        VK_PC_SET(r, DELTA_RULE, pc);
        vk_grid_fold(r, (uint64_t)dn->n_v_head * vk_div_up((uint64_t)dn->v_dim, VK_DN_DT), 1);
        c->fuse_idx = -1;
        return;
    }
    if (!(r = vk_rec_new(c, VKP_DELTA_RULE, VKC_ATTN))) return;
    vk_bind(r, 0, &c->act[ACT_DN_CONV], 0);
    vk_bind(r, 1, &c->act[ACT_DN_O], 1);
    vk_bind(r, 2, &c->act[ACT_DN_BETA], 0);
    vk_bind(r, 3, &c->act[ACT_DN_ALPHA], 0);
    vk_bind_range(r, 4, c->st.buf, s_off, s_bytes, 1);
    vk_bind_vector(c, r, 5, wa);
    vk_bind_part(r, &c->vk->parts[wd->part0]);
    VK_PC_SET(r, DELTA_RULE, pc);
    vk_grid_fold(r, (uint64_t)dn->n_v_head, 1);
    c->fuse_idx = -1;
}

static void vk_op_delta_net(void *be, const moe_deltanet *dn, const moe_weight *a_coef, const moe_weight *dt_bias, int n) {
    vk_dn_l2norm(be, dn, n);
    vk_dn_rule(be, dn, a_coef, dt_bias, n);
}

static void vk_op_gated_rmsnorm(void *be, int dst, int gate, const moe_weight *w, int n_rows, int width, float eps) {
    vk_ctx *c = be;
    const vk_wt *wt = vk_wt_of(c, w);
    if (c->err || n_rows <= 0 || !wt) return;
    vk_pn_touch(c, (1u << dst) | (1u << gate), 1u << dst);
    vk_rec *r = vk_rec_new(c, VKP_GATED_NORM, VKC_NORM);
    if (!r) return;
    vk_bind(r, 0, &c->act[dst], 1);
    vk_bind_vector(c, r, 2, wt);
    vk_bind(r, 3, &c->act[gate], 0);
    VK_PC_SET(r, GATED_NORM, {.width = (uint32_t)width, .rows = (uint32_t)n_rows, .eps = eps});
    vk_grid_fold(r, (uint64_t)n_rows, 1);
    c->fuse_idx = -1;
}

/* all states to / from host f32, state by state (conv rows, then the delta-rule matrix) */
static moe_status vk_state_copy(vk_ctx *c, uint8_t *host, int download) {
    const moe_weights *w = c->w;
    if (c->dead) return vk_fail(MOE_ERR_DEVICE, "Vulkan: the device was lost earlier; this context cannot run");
    vk_xfer x;
    moe_status st = vk_xfer_begin(c->vk, &x, (VkDeviceSize)8 << 20, download);
    if (st) return st;
    for (int i = 0; i < w->hp.n_state; i++) {
        VkDeviceSize cb = (VkDeviceSize)w->states[i].conv_elems * 4, rb = (VkDeviceSize)w->states[i].rec_elems * 4;
        if (cb) vk_xfer_copy(&x, host, cb, c->st.buf, c->st_conv[i]);
        host += cb;
        vk_xfer_copy(&x, host, rb, c->st.buf, c->st_rec[i]);
        host += rb;
    }
    return vk_xfer_end(&x);
}
static moe_status vk_state_save(void *be, float *dst) { return vk_state_copy(be, (uint8_t *)dst, 1); }
static moe_status vk_state_load(void *be, const float *src) { return vk_state_copy(be, (uint8_t *)(uintptr_t)src, 0); }

static void vk_state_checkpoint(void *be, int slot) {
    vk_ctx *c = be;
    if (c->err || slot < 0 || slot >= c->n_ckpt) return;
    vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
    if (!r) return;
    vk_bind_range(r, 0, c->st.buf, 0, c->st_bytes, 0);
    vk_bind_range(r, 1, c->ck.buf, (VkDeviceSize)slot * c->st_bytes, 0, 1);
    c->fuse_idx = -1;
}

static void vk_state_restore(void *be, int slot) {
    vk_ctx *c = be;
    if (c->err || slot >= c->n_ckpt) return;
    vk_rec *r = vk_rec_new(c, slot < 0 ? VK_REC_FILL : VK_REC_COPY, VKC_COPY);
    if (!r) return;
    if (slot >= 0) vk_bind_range(r, 0, c->ck.buf, (VkDeviceSize)slot * c->st_bytes, c->st_bytes, 0);
    vk_bind_range(r, 1, c->st.buf, 0, c->st_bytes, 1);
    c->fuse_idx = -1;
}

/* ============================================================================================ */
/* 8. one pass for many contexts (moe_step_batch)                                               */
/* ============================================================================================ */
/* moe.c's scratch context (the lead) records the pass: every op that treats rows one by one
   (embedding, norms, matrix products, router, experts, LM head) runs once over the rows of all
   segments, so each weight is read once per pass. Rope, the KV store and attention read a context's
   own positions and caches, the Gated DeltaNet conv and delta rule its recurrent states: the lead
   records them segment by segment, aimed at that context (as the CPU's bt_aim does): its
   activation roles become views of the segment's rows, its caches, rope tables, split-KV scratch,
   recurrent states, checkpoints and chunked-delta-rule scratch are the context's (so is its choice
   of delta-rule form), and its records bind the segment's header in the step buffer (slot) as
   their step, so the shaders see the context's position, unchanged, and the records stay the
   same from one decode step to the next (the command buffer is replayed). Each segment's
   dispatches are those the context records alone (q/k norm fused with rope, the same attention
   and delta-rule kernels; the state checkpoints its lone step would copy), so only the row-wise
   kernels' shape differs from separate steps. */
typedef struct vk_aimed {
    vk_buf act[4];
    vk_buf kc, vc, split;
    VkDeviceSize *kv_off, *kv_size;
    int32_t *kv_rows;
    struct vk_rope_tab rope[VK_MAX_ROPES];
    int n_rope, kv_f16, have_pos0, step_pos0;
    vk_buf st, ck, dn_scr;
    VkDeviceSize *st_conv, *st_rec, st_bytes;
    int n_ckpt, dn_chunk_min;
} vk_aimed;

/* aims the lead at segment s: roles[i] become views of the segment's rows (widths[i] floats wide) */
static void vk_aim(vk_ctx *c, int s, const int *roles, const int *widths, int nr, vk_aimed *sv) {
    const moe_vk_seg *g = &c->bseg[s];
    const vk_ctx *o = g->be;
    for (int i = 0; i < nr; i++) {
        sv->act[i] = c->act[roles[i]];
        c->act[roles[i]].off = (VkDeviceSize)g->row0 * (VkDeviceSize)widths[i] * 4;
        c->act[roles[i]].size = (VkDeviceSize)g->n * (VkDeviceSize)widths[i] * 4;
    }
    sv->kc = c->kc, sv->vc = c->vc, sv->split = c->split;
    sv->kv_off = c->kv_off, sv->kv_size = c->kv_size, sv->kv_rows = c->kv_rows;
    memcpy(sv->rope, c->rope, sizeof c->rope);
    sv->n_rope = c->n_rope, sv->kv_f16 = c->kv_f16, sv->have_pos0 = c->have_pos0, sv->step_pos0 = c->step_pos0;
    sv->st = c->st, sv->ck = c->ck, sv->dn_scr = c->dn_scr;
    sv->st_conv = c->st_conv, sv->st_rec = c->st_rec, sv->st_bytes = c->st_bytes;
    sv->n_ckpt = c->n_ckpt, sv->dn_chunk_min = c->dn_chunk_min;
    c->kc = o->kc, c->vc = o->vc, c->split = o->split;
    c->kv_off = o->kv_off, c->kv_size = o->kv_size, c->kv_rows = o->kv_rows;
    memcpy(c->rope, o->rope, sizeof c->rope);
    c->n_rope = o->n_rope, c->kv_f16 = o->kv_f16;
    /* recurrent states: the context's own, its checkpoints, and its choice of delta rule (the
       chunked form from its dn_chunk_min on, in its scratch: a segment has at most its n_batch rows) */
    c->st = o->st, c->ck = o->ck, c->dn_scr = o->dn_scr;
    c->st_conv = o->st_conv, c->st_rec = o->st_rec, c->st_bytes = o->st_bytes;
    c->n_ckpt = o->n_ckpt, c->dn_chunk_min = o->dn_chunk_min;
    c->have_pos0 = 1, c->step_pos0 = g->pos0; /* the segment's header holds its position: pos_delta 0 */
    c->cur_slot = (uint16_t)(s + 1);
}

static void vk_unaim(vk_ctx *c, const int *roles, int nr, const vk_aimed *sv) {
    for (int i = 0; i < nr; i++) c->act[roles[i]] = sv->act[i];
    c->kc = sv->kc, c->vc = sv->vc, c->split = sv->split;
    c->kv_off = sv->kv_off, c->kv_size = sv->kv_size, c->kv_rows = sv->kv_rows;
    memcpy(c->rope, sv->rope, sizeof c->rope);
    c->n_rope = sv->n_rope, c->kv_f16 = sv->kv_f16, c->have_pos0 = sv->have_pos0, c->step_pos0 = sv->step_pos0;
    c->st = sv->st, c->ck = sv->ck, c->dn_scr = sv->dn_scr;
    c->st_conv = sv->st_conv, c->st_rec = sv->st_rec, c->st_bytes = sv->st_bytes;
    c->n_ckpt = sv->n_ckpt, c->dn_chunk_min = sv->dn_chunk_min;
    c->cur_slot = 0;
}

/* does record r bind buffer b? */
static int vk_rec_touches(const vk_rec *r, VkBuffer b) {
    for (int s = 0; s < VK_NB; s++)
        if (r->buf[s] == b) return 1;
    return 0;
}

/* Takes out the per-head RMSNorm of buf over all rows (q_norm / k_norm) that the forward recorded
   before this rope, if no record since touched buf; *out gets it */
static int vk_bt_take_norm(vk_ctx *c, int buf, int rows, int head_dim, vk_rec *out) {
    VkBuffer b = c->act[buf].buf;
    for (int i = c->n_recs - 1; i >= 0; i--) {
        vk_rec *q = &c->recs[i];
        if (q->pipe >= VK_REC_FILL) return 0;
        if (!vk_rec_touches(q, b)) continue;
        vk_pc_RMSNORM qn;
        VK_PC_GET(q, RMSNORM, qn);
        if (q->pipe != VKP_RMSNORM || q->slot || q->buf[0] != b || q->buf[1] != b || qn.width != (uint32_t)head_dim ||
            qn.rows != (uint32_t)rows)
            return 0;
        *out = *q;
        memmove(c->recs + i, c->recs + i + 1, (size_t)(c->n_recs - i - 1) * sizeof *c->recs);
        memmove(c->rec_cost + i, c->rec_cost + i + 1, (size_t)(c->n_recs - i - 1) * sizeof *c->rec_cost);
        c->n_recs--;
        c->fuse_idx = -1;
        return 1;
    }
    return 0;
}

static int vk_bt_rows(const vk_ctx *c) {
    const moe_vk_seg *g = &c->bseg[c->n_bseg - 1];
    return g->row0 + g->n;
}

static void vk_bt_rope(void *be, int buf, int n, int n_head, int head_dim, const moe_rope *rope, int pos0) {
    (void)n, (void)pos0; /* the segments have their own */
    vk_ctx *c = be;
    if (c->err) return;
    vk_pn_flush(c);
    vk_rec norm;
    int has_norm = vk_bt_take_norm(c, buf, vk_bt_rows(c) * n_head, head_dim, &norm), width = n_head * head_dim;
    for (int s = 0; s < c->n_bseg && !c->err; s++) {
        const moe_vk_seg *g = &c->bseg[s];
        vk_aimed sv;
        vk_aim(c, s, &buf, &width, 1, &sv);
        vk_rec *r = has_norm ? vk_rec_new(c, VK_REC_FILL, VKC_NORM) : NULL; /* (a plain slot: the norm's pipeline is made) */
        if (r) { /* the norm of the segment's rows, as the context records it alone: rope fuses with it */
            *r = norm;
            r->slot = c->cur_slot;
            vk_bind(r, 0, &c->act[buf], 0);
            vk_bind(r, 1, &c->act[buf], 1);
            r->pc[VK_PC_WORD(RMSNORM, rows)] = (uint32_t)(g->n * n_head);
            vk_grid_fold(r, (uint64_t)g->n * (uint64_t)n_head, 1);
        }
        vk_op_rope(c, buf, g->n, n_head, head_dim, rope, g->pos0);
        vk_unaim(c, &buf, 1, &sv);
    }
}

static void vk_bt_attention(void *be, const moe_attn *a, int n, int pos0) {
    (void)n, (void)pos0;
    vk_ctx *c = be;
    if (c->err) return;
    vk_pn_flush(c);
    int q = a->n_head * a->head_dim, kv = a->n_head_kv * a->head_dim;
    const int roles[] = {ACT_Q, ACT_K, ACT_V, ACT_ATTN}, widths[] = {q, kv, kv, q};
    for (int s = 0; s < c->n_bseg && !c->err; s++) {
        vk_aimed sv;
        vk_aim(c, s, roles, widths, 4, &sv);
        vk_op_attention(c, a, c->bseg[s].n, c->bseg[s].pos0);
        vk_unaim(c, roles, 4, &sv);
    }
}

/* the Gated DeltaNet ops that carry a context's recurrent state: per segment, on its state, as the
   context records them alone (the projections and gates around them run over all rows) */
static void vk_bt_ssm_conv(void *be, const moe_deltanet *dn, const moe_weight *w, int n) {
    (void)n;
    vk_ctx *c = be;
    if (c->err) return;
    vk_pn_flush(c);
    int C = vk_dn_channels(dn);
    const int roles[] = {ACT_DN_QKV, ACT_DN_CONV}, widths[] = {C, C};
    for (int s = 0; s < c->n_bseg && !c->err; s++) {
        vk_aimed sv;
        vk_aim(c, s, roles, widths, 2, &sv);
        vk_op_ssm_conv(c, dn, w, c->bseg[s].n);
        vk_unaim(c, roles, 2, &sv);
    }
}

/* the row widths (floats) of the delta rule's roles ACT_DN_CONV, _BETA, _ALPHA, _O */
static void vk_dn_widths(const moe_deltanet *dn, int widths[4]) {
    widths[0] = vk_dn_channels(dn);
    widths[1] = dn->ba_grouped ? 2 * dn->n_v_head : dn->n_v_head;
    widths[2] = dn->n_v_head;
    widths[3] = dn->n_v_head * dn->v_dim;
}

static void vk_bt_delta_net(void *be, const moe_deltanet *dn, const moe_weight *a, const moe_weight *dt, int n) {
    vk_ctx *c = be;
    if (c->err) return;
    vk_pn_flush(c);
    vk_dn_l2norm(c, dn, n); /* row by row: once over all rows */
    int widths[4];
    vk_dn_widths(dn, widths);
    const int roles[] = {ACT_DN_CONV, ACT_DN_BETA, ACT_DN_ALPHA, ACT_DN_O};
    for (int s = 0; s < c->n_bseg && !c->err; s++) {
        vk_aimed sv;
        vk_aim(c, s, roles, widths, 4, &sv);
        vk_dn_rule(c, dn, a, dt, c->bseg[s].n);
        vk_unaim(c, roles, 4, &sv);
    }
}

const char *moe_vk_batch_unsupported(const moe_vk_backend *vk) {
    const moe_weights *w = vk->w;
    if (vk->xg) return "the GPU expert slot cache (gpu_budget_bytes / host_budget_bytes below the weights)";
    VkDeviceSize al = vk->props.limits.minStorageBufferOffsetAlignment;
    for (int l = 0; al > 4 && l < w->hp.n_layer; l++) { /* segment views start at row · width · 4 bytes */
        const moe_layer_plan *lp = &w->layers[l].p;
        const moe_attn *a = &lp->attn;
        if ((VkDeviceSize)(a->n_head * a->head_dim * 4) % al || (VkDeviceSize)(a->n_head_kv * a->head_dim * 4) % al)
            return "attention rows that are not aligned to the device's minStorageBufferOffsetAlignment";
        if (lp->attn_kind != MOE_ATTN_DELTANET) continue;
        int widths[4];
        vk_dn_widths(&lp->dn, widths);
        for (int i = 0; i < 4; i++)
            if ((VkDeviceSize)widths[i] * 4 % al) return "Gated DeltaNet rows that are not aligned to the device's minStorageBufferOffsetAlignment";
    }
    return NULL;
}

moe_status moe_vk_batch_begin(void *lead, const moe_vk_seg *seg, int n_seg) {
    vk_ctx *c = lead;
    if (n_seg < 1 || (VkDeviceSize)n_seg > (c->step.size - c->seg_base) / c->seg_stride || n_seg > 65535)
        return vk_fail(MOE_ERR_INVALID_ARG, "Vulkan: %d segments in a pass of at most %d rows", n_seg, c->shape.n_batch);
    for (int s = 0; s < n_seg; s++) {
        uint32_t *h = (uint32_t *)(c->step.map + c->seg_base + (VkDeviceSize)s * c->seg_stride);
        h[0] = (uint32_t)seg[s].pos0;
        h[1] = (uint32_t)seg[s].n;
    }
    c->bseg = seg;
    c->n_bseg = n_seg;
    return MOE_OK;
}

/* after the forward: each segment that ends at a checkpoint position of its context copies its
   states there, as its lone step would (ctx_run) */
void moe_vk_batch_checkpoints(void *lead) {
    vk_ctx *c = lead;
    for (int s = 0; s < c->n_bseg && !c->err; s++) {
        if (c->bseg[s].ck < 0) continue;
        vk_aimed sv;
        vk_aim(c, s, NULL, NULL, 0, &sv);
        vk_state_checkpoint(c, c->bseg[s].ck);
        vk_unaim(c, NULL, 0, &sv);
    }
}

void moe_vk_batch_end(void *lead) {
    vk_ctx *c = lead;
    c->bseg = NULL;
    c->n_bseg = 0;
}

/* the rows that give logits to rows 0.. of ACT_XN (or of the pending final norm's input), in
   segment order (through ACT_OUT: one copy may not read and write overlapping ranges of one buffer) */
void moe_vk_batch_gather(void *lead) {
    vk_ctx *c = lead;
    if (c->err) return;
    VkDeviceSize rb = (VkDeviceSize)c->w->hp.n_embd * 4;
    int moved = 0, outs = 0;
    for (int s = 0; s < c->n_bseg; s++) {
        const moe_vk_seg *g = &c->bseg[s];
        moved |= g->n_out && g->row0 + g->n - g->n_out != g->out0;
        outs += g->n_out;
    }
    if (!moved) return; /* (decode: the final norm stays pending, applied inside the LM head's matvec as alone) */
    /* the final norm not dispatched yet: its input rows move instead and it stays pending over
       them, so that the LM head applies it as each context alone does (inline in a matvec) */
    int role = ACT_XN;
    if (c->pn.active && !c->pn.done && c->pn.dst == ACT_XN && c->pn.src != ACT_OUT && c->pn.width == c->w->hp.n_embd)
        role = c->pn.src, c->pn.rows = outs;
    else
        vk_pn_flush(c);
    for (int s = 0; s < c->n_bseg; s++) {
        const moe_vk_seg *g = &c->bseg[s];
        vk_rec *r = g->n_out ? vk_rec_new(c, VK_REC_COPY, VKC_COPY) : NULL;
        if (!r) continue;
        vk_bind_range(r, 0, c->act[role].buf, (VkDeviceSize)(g->row0 + g->n - g->n_out) * rb, (VkDeviceSize)g->n_out * rb, 0);
        vk_bind_range(r, 1, c->act[ACT_OUT].buf, (VkDeviceSize)g->out0 * rb, 0, 1);
    }
    vk_rec *r = vk_rec_new(c, VK_REC_COPY, VKC_COPY);
    if (r) {
        vk_bind_range(r, 0, c->act[ACT_OUT].buf, 0, (VkDeviceSize)outs * rb, 0);
        vk_bind_range(r, 1, c->act[role].buf, 0, 0, 1);
    }
    c->fuse_idx = -1;
}

void moe_vk_batch_logits(void *lead, int row0, int n, float *dst) {
    vk_ctx *c = lead;
    size_t nv = (size_t)c->w->hp.n_vocab;
    memcpy(dst, (const float *)c->logits.map + (size_t)row0 * nv, (size_t)n * nv * sizeof(float));
}

const moe_ops moe_vk_ops = {vk_op_embed, vk_op_rmsnorm, vk_op_matmul, vk_op_rope, vk_op_attention, vk_op_add, vk_op_route,
                            vk_op_experts_glu, vk_op_experts_down, vk_op_scale, vk_op_copy, vk_op_glu, vk_op_softcap, vk_begin_step, vk_end_step,
                            vk_logits_rows, vk_logits_out, vk_read_logits, vk_kv_save,
                            vk_kv_load, vk_stats, vk_profile, vk_profile_get, vk_bandwidth_probe,
                            /* hybrid models (Gated DeltaNet) */
                            vk_op_split_heads, vk_op_sigmoid_mul, vk_op_gate_rows, vk_op_ssm_conv, vk_op_delta_net, vk_op_gated_rmsnorm,
                            vk_state_save, vk_state_load, vk_state_checkpoint, vk_state_restore, vk_submit_times};

/* the lead's ops in a pass of moe_step_batch: the per-context ones above */
const moe_ops moe_vk_batch_ops = {vk_op_embed, vk_op_rmsnorm, vk_op_matmul, vk_bt_rope, vk_bt_attention, vk_op_add, vk_op_route,
                                  vk_op_experts_glu, vk_op_experts_down, vk_op_scale, vk_op_copy, vk_op_glu, vk_op_softcap, vk_begin_step,
                                  vk_end_step, vk_logits_rows, vk_logits_out, vk_read_logits, vk_kv_save,
                                  vk_kv_load, vk_stats, vk_profile, vk_profile_get, vk_bandwidth_probe,
                                  vk_op_split_heads, vk_op_sigmoid_mul, vk_op_gate_rows, vk_bt_ssm_conv, vk_bt_delta_net, vk_op_gated_rmsnorm,
                                  vk_state_save, vk_state_load, vk_state_checkpoint, vk_state_restore, vk_submit_times};

